"""LoRA's run config, per-architecture default targets, and translation to and from PEFT's LoraConfig dict."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn

from .._base import MethodConfigBase
from ..peft_format import TASK_TYPES

# PEFT's q/v-style defaults for the families we test, plus close relatives that share llama's names.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}

ALL_LINEAR = "all-linear"


class LoraConfig(MethodConfigBase):
    """W' = W + s·B·A on each targeted Linear/Conv1D; s = alpha/r (rsLoRA: alpha/sqrt(r))."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="Rank of the update B·A.")
    alpha: float = Field(
        16.0, gt=0, description="Scale numerator: s = alpha/r (or alpha/sqrt(r) with use_rslora)."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input (0 = no extra copy)."
    )
    target_modules: list[str] | str | None = Field(
        None,
        description="Module names (suffix match), one full-match regex, or 'all-linear' (every Linear/Conv1D "
        "except the output head). Default: the architecture's attention q/v projections.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scale alpha/sqrt(r).")
    fused_forward: bool = Field(
        True,
        description="Plain LoRA on an nn.Linear base runs as the base GEMM plus one in-place rank-r addmm_ (no "
        "(tokens x d_out) temporaries); false: base output + a separate LoRA delta (same numbers, for comparison).",
    )
    use_dora: bool = Field(
        False, description="DoRA: learn a per-output-row magnitude and the LoRA direction."
    )
    init: Literal["default", "gaussian", "pissa"] = Field(
        "default",
        description="default: Kaiming-uniform A, zero B; gaussian: N(0, 1/r) A, zero B; pissa: A, B from the "
        "top-r SVD of W, with W replaced by its residual so the model is unchanged at step 0.",
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved with the adapter (e.g. a new head or resized embeddings). "
        "Default: the fresh task head for seq-cls, none otherwise.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and len(v) == 0:
            raise ValueError("target_modules: give at least one name, a regex, or 'all-linear'")
        return v

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def default_targets(model: nn.Module) -> list[str]:
    """The q/v projections for known families; otherwise q_proj/v_proj if present, else a clear error."""
    family = getattr(getattr(model, "config", None), "model_type", "")
    if family in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[family])
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if {"q_proj", "v_proj"} <= leaves:
        return ["q_proj", "v_proj"]
    raise ValueError(
        f"method.target_modules: no default for model type {family!r}; name the modules to adapt "
        "(e.g. target_modules: [q_proj, v_proj]) or use 'all-linear'"
    )


def to_peft_dict(
    cfg: LoraConfig,
    target_modules: list[str] | str,
    modules_to_save: list[str],
    task: str,
    base_model_name: str,
    fan_in_fan_out: bool,
) -> dict[str, Any]:
    """A PEFT 0.21-compatible adapter_config.json body for this config."""
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(task),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "modules_to_save": modules_to_save or None,
        "base_model_name_or_path": base_model_name or None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
        "auto_mapping": None,
    }


def _unsupported(d: dict[str, Any]) -> list[str]:
    bad = []
    if d.get("peft_type", "LORA") != "LORA":
        bad.append(f"peft_type={d.get('peft_type')!r} (only LORA)")
    if d.get("bias", "none") != "none":
        bad.append(f"bias={d.get('bias')!r}")
    for key in (
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "exclude_modules",
        "target_parameters",
        "layer_replication",
        "trainable_token_indices",
    ):
        if d.get(key):
            bad.append(f"{key}={d[key]!r}")
    if d.get("lora_bias"):
        bad.append("lora_bias=true")
    return bad


def lora_config_from_peft(d: dict[str, Any]) -> LoraConfig:
    """Translate a PEFT adapter_config.json dict into our LoraConfig; unsupported PEFT features are errors."""
    bad = _unsupported(d)
    if bad:
        raise ValueError(
            "adapter_config.json uses PEFT features sftlab's LoRA does not support: " + ", ".join(bad)
        )
    init_raw = d.get("init_lora_weights", True)
    if init_raw is True or init_raw is False or init_raw == "default":
        init = "default"
    elif init_raw in ("gaussian", "pissa"):
        init = init_raw
    else:
        raise ValueError(
            f"adapter_config.json: init_lora_weights={init_raw!r} is not supported (True, gaussian, pissa)"
        )
    targets = d.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    elif targets == "all-linear":
        targets = ALL_LINEAR
    return LoraConfig(
        r=int(d["r"]),
        alpha=float(d.get("lora_alpha", 8)),
        dropout=float(d.get("lora_dropout", 0.0)),
        target_modules=targets,
        use_rslora=bool(d.get("use_rslora", False)),
        use_dora=bool(d.get("use_dora", False)),
        init=init,
        modules_to_save=list(d["modules_to_save"]) if d.get("modules_to_save") else [],
    )
