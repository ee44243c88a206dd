"""Full fine-tuning (every weight trains) and freeze-tuning (only chosen blocks or modules train)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..errors import ConfigError
from ._base import MethodConfigBase, MethodContext, MethodSpec
from ._targets import block_lists, freeze_all, is_task_heads, task_head_modules, unfreeze_modules


class FullConfig(MethodConfigBase):
    name: Literal["full"] = "full"


class FreezeConfig(MethodConfigBase):
    name: Literal["freeze"] = "freeze"
    trainable_layers: int | None = Field(
        None, ge=0, description="Train only the last N transformer blocks (per block stack)."
    )
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="Regexes searched in parameter names; matching parameters train (e.g. 'lm_head', 'norm').",
    )
    train_head: bool = Field(True, description="Also train the task head (LM head / classifier).")

    @model_validator(mode="after")
    def _something_trains(self):
        if self.trainable_layers is None and not self.trainable_modules and not self.train_head:
            raise ValueError("method: freeze needs trainable_layers, trainable_modules or train_head=true")
        return self


def _apply_full(model: nn.Module, cfg: FullConfig, ctx: MethodContext) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def _apply_freeze(model: nn.Module, cfg: FreezeConfig, ctx: MethodContext) -> None:
    freeze_all(model)
    if cfg.trainable_layers:
        stacks = block_lists(model)
        if not stacks:
            raise ConfigError(
                "method.trainable_layers: this model has no transformer block list to pick blocks from; "
                "use method.trainable_modules"
            )
        deepest = max(len(blocks) for _, blocks in stacks)
        if cfg.trainable_layers > deepest:
            have = ", ".join(f"{name}: {len(blocks)}" for name, blocks in stacks)
            raise ConfigError(
                f"method.trainable_layers: {cfg.trainable_layers} is more blocks than the model has ({have}); "
                f"use at most {deepest}, or method.name=full to train every weight"
            )
        for name, blocks in stacks:
            for i in range(max(0, len(blocks) - cfg.trainable_layers), len(blocks)):
                unfreeze_modules(model, [f"{name}.{i}"])
    if cfg.trainable_modules:
        pats = [re.compile(p) for p in cfg.trainable_modules]
        for n, p in model.named_parameters():
            if any(pat.search(n) for pat in pats):
                p.requires_grad_(True)
    if cfg.train_head:  # the fresh head, or a multi-task run's per-task heads
        heads = task_head_modules(model, ctx.task) + [n for n, m in model.named_modules() if is_task_heads(m)]
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None and ctx.task != "seq-cls":
            out.weight.requires_grad_(True)
        unfreeze_modules(model, heads)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "method: freeze selected no trainable parameters; check trainable_layers/trainable_modules"
        )


def _save_full(model: nn.Module, cfg, out_dir: Path, ctx: MethodContext) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def _load_full(model: nn.Module, cfg, in_dir: Path, ctx: MethodContext) -> None:
    """Nothing to do: a full-model run is reloaded from final/ as the base itself."""


METHODS = {
    "full": MethodSpec(
        "full",
        FullConfig,
        _apply_full,
        _save_full,
        _load_full,
        saves_full_model=True,
        help="Train every weight.",
    ),
    "freeze": MethodSpec(
        "freeze",
        FreezeConfig,
        _apply_freeze,
        _save_full,
        _load_full,
        saves_full_model=True,
        help="Train only the last N blocks and/or modules matching patterns.",
    ),
}
