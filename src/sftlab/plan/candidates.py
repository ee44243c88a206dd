"""The methods a plan weighs: the survey's families, each as a `method:` section sftlab trains as it stands.

Full fine-tuning, freezing all but the last blocks, LoRA at three ranks and DoRA (on every linear layer, alpha = 2r),
bottleneck adapters as Houlsby and Pfeiffer place them, prefix tuning and prompt tuning, and QLoRA (LoRA r=16 on an
NF4 base: `extra["quantize"]`, the run config's model.quantize). A method sftlab does not have yet is listed with
`available=False` and the reason, so the table says so instead of hiding it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    key: str  # short id: full, freeze, lora-r16, ...
    label: str
    method: dict  # the run config's `method:` section
    family: str  # full | partial | reparameterized | additive | soft-prompt (the survey's taxonomy)
    merges: bool = False  # folds into the base weights after training (no inference cost)
    available: bool = True
    note: str = ""
    virtual_tokens: int = 0  # prompt tuning: positions added to every sequence
    prefix_tokens: int = 0  # prefix tuning: keys/values added to every attention call
    extra: dict = field(default_factory=dict)


def freeze_layers(layers: int) -> int:
    """How many of the last blocks the `freeze` candidate trains: a quarter, at least one."""
    return max(1, round(layers / 4))


def candidates(layers: int, task: str) -> list[Candidate]:
    """The candidates for a model with `layers` blocks (per stack)."""
    n = freeze_layers(layers)
    out = [
        Candidate("full", "full", {"name": "full"}, "full"),
        Candidate(
            "freeze", f"freeze (last {n} of {layers})", {"name": "freeze", "trainable_layers": n}, "partial"
        ),
    ]
    for r in (8, 16, 64):
        method = {"name": "lora", "r": r, "alpha": 2.0 * r, "target_modules": "all-linear"}
        out.append(Candidate(f"lora-r{r}", f"LoRA r={r}", method, "reparameterized", merges=True))
    dora = {"name": "lora", "r": 16, "alpha": 32.0, "target_modules": "all-linear", "use_dora": True}
    out.append(Candidate("dora-r16", "DoRA r=16", dora, "reparameterized", merges=True))
    for placement in ("houlsby", "pfeiffer"):
        out.append(
            Candidate(
                placement,
                f"adapter ({placement.capitalize()})",
                {"name": "adapter", "placement": placement, "reduction_factor": 16.0},
                "additive",
            )
        )
    out.append(
        Candidate(
            "prefix",
            "prefix (16)",
            {"name": "prefix", "num_virtual_tokens": 16},
            "soft-prompt",
            prefix_tokens=16,
        )
    )
    out.append(
        Candidate(
            "prompt",
            "prompt (16)",
            {"name": "prompt", "num_virtual_tokens": 16},
            "soft-prompt",
            virtual_tokens=16,
        )
    )
    qlora = {"name": "lora", "r": 16, "alpha": 32.0, "target_modules": "all-linear"}
    out.append(
        Candidate(
            "qlora-r16",
            "NF4 base + LoRA r=16",
            qlora,
            "reparameterized",
            merges=True,
            extra={"quantize": "nf4"},
        )
    )
    return out
