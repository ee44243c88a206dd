"""The recommendation: a small rule table over the survey's four factors, each reason naming its factor.

The survey closes with how to choose: (1) compute and time; (2) task difficulty and data size -- large data close
to pretraining favours full fine-tuning, small data or data far from pretraining instruction data and PEFT;
(3) the application -- natural-language control needs instruction tuning, many tasks or domains multi-task
training; (4) maintainability -- frequent updates and many tasks favour PEFT with one small module per task.

`decide(Situation)` applies RULES in order: the first whose condition holds picks the method, among the
candidates that fit the device (and the time budget); then every advice rule that holds adds its line (data
format, multi-task, checkpointing). A Situation is plain data, so the table is tested case by case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

COMPUTE = "compute and time"
DATA = "task difficulty and data size"
APPLICATION = "application"
MAINTAINABILITY = "maintainability"
FACTORS = (COMPUTE, DATA, APPLICATION, MAINTAINABILITY)

NEEDS = ("instructions", "many-tasks", "frequent-updates", "low-latency", "small-storage")
# Data counts as large when one epoch holds at least this many tokens per model parameter.
LARGE_DATA_TOKENS_PER_PARAM = 1.0
# Prompt tuning matches full fine-tuning only on large models (Lester et al. 2021: from about 10B parameters).
PROMPT_TUNING_MIN_PARAMS = 10e9

PEFT_ORDER = ("lora-r16", "lora-r8", "dora-r16", "lora-r64", "houlsby", "pfeiffer", "prefix", "prompt")


@dataclass(frozen=True)
class Situation:
    """Everything the rules read (estimates and the user's statements), keyed by candidate key."""

    fits: dict[str, bool]  # fits the device without activation checkpointing
    fits_ckpt: dict[str, bool]  # ... with it
    within_time: dict[str, bool]  # one epoch within --time-budget (all True without a budget)
    storage: dict[str, float]  # bytes one task's run saves
    params: int  # base model parameters
    tokens: float  # tokens of one epoch
    close_to_pretraining: bool  # plain text (format text) rather than instructions/labels
    tasks: int = 1
    needs: frozenset[str] = frozenset()
    data_format: str = "alpaca"
    fits_sharded: dict[str, bool] = field(
        default_factory=dict
    )  # FSDP over the devices (with or without ckpt)
    devices: int = 1

    def fits_one(self, key: str) -> bool:
        """Fits every device whole (one device, or DDP), with or without activation checkpointing."""
        return self.fits.get(key, False) or self.fits_ckpt.get(key, False)

    def usable(self, key: str) -> bool:
        return (self.fits_one(key) or self.fits_sharded.get(key, False)) and self.within_time.get(key, True)

    @property
    def large_data(self) -> bool:
        return self.tokens >= LARGE_DATA_TOKENS_PER_PARAM * self.params

    @property
    def many_tasks(self) -> bool:
        return self.tasks > 1 or "many-tasks" in self.needs

    @property
    def maintained(self) -> bool:
        """Many tasks, frequent updates or little storage: one small module per task/version."""
        return self.many_tasks or bool(self.needs & {"frequent-updates", "small-storage"})


@dataclass(frozen=True)
class Reason:
    factor: str
    text: str


@dataclass
class Recommendation:
    choice: str | None  # a candidate key, or None when nothing fits
    reasons: list[Reason] = field(default_factory=list)
    advice: list[Reason] = field(default_factory=list)
    rule: str = ""


def _first_usable(s: Situation, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if s.usable(k)), None)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.1f} MB"


# -- method rules: (name, condition, pick) ---------------------------------------------------------------------
# pick(s) -> (key, reasons) or None when the rule's method does not fit (the next rule then applies).


def _nothing_fits(s: Situation):
    return None, [
        Reason(COMPUTE, "no method fits the device's memory (or the time budget), even with activation "
               "checkpointing, not even LoRA on an NF4 (4-bit) base: use a smaller model, a shorter --seq-len or "
               "--batch-size, or a larger device"),
    ]  # fmt: skip


def _per_task_peft(s: Situation):
    pick = _first_usable(s, ("lora-r16", "lora-r8", "houlsby", "pfeiffer", "prefix", "prompt"))
    if pick is None:
        return None
    why = []
    if s.many_tasks:
        k = max(s.tasks, 2)
        why.append(Reason(MAINTAINABILITY, f"{k} tasks: one base model plus one small module per task "
                          f"({_gb(s.storage[pick])} each) instead of {k} full copies ({_gb(s.storage['full'])} "
                          "each); sftlab routes each batch row to its own adapter"))  # fmt: skip
    if "frequent-updates" in s.needs:
        why.append(Reason(MAINTAINABILITY, f"frequent updates: retraining and shipping {_gb(s.storage[pick])} "
                          f"per update, not {_gb(s.storage['full'])}"))  # fmt: skip
    if "small-storage" in s.needs:
        why.append(Reason(MAINTAINABILITY, f"small storage: {_gb(s.storage[pick])} per task"))
    return pick, why


def _full(s: Situation):
    if not s.usable("full"):
        return None
    return "full", [
        Reason(DATA, f"large data close to pretraining ({s.tokens:,.0f} tokens an epoch for {s.params:,} "
               "parameters, plain text): every weight has data to learn from"),
        Reason(COMPUTE, "full fine-tuning fits the device" + _how_it_fits(s, "full")),
    ]  # fmt: skip


def _tight_memory(s: Situation):
    pick = _first_usable(
        s, ("lora-r16", "lora-r8", "dora-r16", "houlsby", "pfeiffer", "prefix", "prompt", "qlora-r16")
    )
    if pick is None:
        return None
    why = [
        Reason(COMPUTE, "full fine-tuning does not fit the device's memory (weights, gradients and two AdamW "
               "moments for every parameter); a frozen base with LoRA keeps them for its small trainable part only"),
    ]  # fmt: skip
    if pick == "qlora-r16":
        why.append(Reason(COMPUTE, "not even the frozen base fits in its own dtype: LoRA on an NF4 (4-bit) base "
                          "(QLoRA, Dettmers et al. 2023) stores it at about half a byte per weight"))  # fmt: skip
    return pick, why


def _large_instructions(s: Situation):
    pick = _first_usable(s, ("lora-r64", "lora-r16"))
    if pick is None:
        return None
    return pick, [
        Reason(DATA, f"large data ({s.tokens:,.0f} tokens an epoch) but not plain text close to pretraining: "
               "a high-rank LoRA has the capacity for it and keeps the base's knowledge"),
    ]  # fmt: skip


def _low_latency(s: Situation):
    pick = _first_usable(s, ("lora-r16", "lora-r8", "dora-r16"))
    if pick is None:
        return None
    return pick, [
        Reason(APPLICATION, "low latency: LoRA merges into the weights, so inference costs what the base costs; "
               "adapters, prefixes and prompts add work to every token"),
    ]  # fmt: skip


def _big_model_prompt(s: Situation):
    if not s.usable("prompt"):
        return None
    return "prompt", [
        Reason(DATA, f"a {s.params / 1e9:.0f}B model with small data: prompt tuning matches full fine-tuning "
               "at this scale (Lester et al. 2021) with a few thousand parameters"),
    ]  # fmt: skip


def _small_data(s: Situation):
    pick = _first_usable(s, PEFT_ORDER)
    if pick is None:
        return None
    return pick, [
        Reason(DATA, f"small data ({s.tokens:,.0f} tokens an epoch for {s.params:,} parameters): a small "
               "trainable part overfits less and leaves the base's abilities in place"),
    ]  # fmt: skip


RULES: list[tuple[str, Callable[[Situation], bool], Callable]] = [
    ("nothing fits", lambda s: not any(s.usable(k) for k in s.fits), _nothing_fits),
    ("many tasks / updates / storage -> per-task PEFT", lambda s: s.maintained, _per_task_peft),
    ("large data close to pretraining + full fits -> full",
     lambda s: s.large_data and s.close_to_pretraining, _full),
    ("tight memory -> LoRA", lambda s: not s.usable("full"), _tight_memory),
    ("large instruction data -> high-rank LoRA", lambda s: s.large_data, _large_instructions),
    ("low latency -> mergeable LoRA", lambda s: "low-latency" in s.needs, _low_latency),
    ("10B+ model, small data -> prompt tuning", lambda s: s.params >= PROMPT_TUNING_MIN_PARAMS, _big_model_prompt),
    ("small data -> PEFT", lambda s: True, _small_data),
]  # fmt: skip

# -- advice rules: (condition, reason) -------------------------------------------------------------------------

ADVICE: list[tuple[Callable[[Situation, str | None], bool], Callable[[Situation, str | None], Reason]]] = [
    (lambda s, c: "instructions" in s.needs and s.data_format in ("text", "classification"),
     lambda s, c: Reason(APPLICATION, f"natural-language control needs instruction data: write the data as "
                         f"instructions and answers (data.format: alpaca or messages), not {s.data_format}; the "
                         "loss then covers the answers only")),
    (lambda s, c: "instructions" in s.needs and s.data_format not in ("text", "classification"),
     lambda s, c: Reason(APPLICATION, f"natural-language control: keep the instruction format ({s.data_format}), "
                         "with the loss on responses only (sftlab's default)")),
    (lambda s, c: s.many_tasks,
     lambda s, c: Reason(APPLICATION, "several tasks: train them together as a mixture (data.tasks, e.g. "
                         "mixing: temperature) so shared skills transfer; keep a per-task eval set")),
    (lambda s, c: c is not None and not s.fits_one(c) and s.fits_sharded.get(c, False),
     lambda s, c: Reason(COMPUTE, f"fits only sharded: train with FSDP over the {s.devices} devices "
                         f"(train.distributed: fsdp, sftlab train --nproc {s.devices}), which splits weights, "
                         "gradients and optimizer state between them")),
    (lambda s, c: c is not None and not s.fits.get(c, True) and s.fits_ckpt.get(c, False),
     lambda s, c: Reason(COMPUTE, "fits only with activation checkpointing: set train.gradient_checkpointing: "
                         "true (about a third more compute per step)")),
    (lambda s, c: c is not None and not s.within_time.get(c, True),
     lambda s, c: Reason(COMPUTE, "one epoch exceeds --time-budget: train for part of an epoch "
                         "(train.max_steps)")),
]  # fmt: skip


def decide(s: Situation) -> Recommendation:
    """The first rule whose condition holds and whose method fits picks; advice rules add their lines."""
    rec = Recommendation(None)
    for name, when, pick in RULES:
        if not when(s):
            continue
        got = pick(s)
        if got is None:
            continue
        rec.choice, rec.reasons, rec.rule = got[0], list(got[1]), name
        break
    if rec.choice is not None and not any(r.factor == COMPUTE for r in rec.reasons):
        how = _how_it_fits(s, rec.choice)
        rec.reasons.append(Reason(COMPUTE, f"it fits the device's memory{how}"
                                  + (" and the time budget" if rec.choice in s.within_time else "")))  # fmt: skip
    if "low-latency" in s.needs and rec.choice and not any(r.factor == APPLICATION for r in rec.reasons):
        rec.reasons.append(_latency_reason(rec.choice))
    rec.advice = [make(s, rec.choice) for when, make in ADVICE if when(s, rec.choice)]
    return rec


def _how_it_fits(s: Situation, key: str) -> str:
    if s.fits.get(key):
        return ""
    if s.fits_ckpt.get(key):
        return " with activation checkpointing"
    return f" sharded over {s.devices} devices (FSDP)"


def _latency_reason(choice: str) -> Reason:
    if choice.startswith(("lora", "dora")) or choice in ("full", "freeze"):
        return Reason(APPLICATION, "low latency: it runs at the base model's cost per token (LoRA/DoRA after "
                      "`sftlab merge` folds it into the weights)")  # fmt: skip
    return Reason(APPLICATION, "low latency: this method adds work to every token (see the inference column); "
                  "LoRA, which merges, costs none")  # fmt: skip
