"""The contract every fine-tuning method fulfils: a config model plus three free functions, and two optional ones.

A method acts on a loaded HF model in place. `apply` freezes the base and injects trainable modules,
`save` writes the method's final artifacts (adapter files, or a full HF model), `load` restores them
onto a model on which `apply` has already run. The training loop only sees parameters with
`requires_grad=True`; it never needs to know which method made them. `merge` (fold the method into plain
weights, for `sftlab merge`) and `route` (per-row adapter names for a mixed batch) are None where a method
has no such thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import nn

from ..strict import StrictModel


class MethodConfigBase(StrictModel):
    name: str
    per_task: bool = Field(
        False,
        description="data.tasks: false: one method shared by every task; true: one adapter per task (lora, adapter) "
        "on the frozen shared base, each batch row routed to its task's adapter, saved as final/<task>/.",
    )


@dataclass
class MethodContext:
    """What a method may need beyond its own config: the task kind, tokenizer and base model name, and which
    named adapter `apply`/`save`/`load` act on (a multi-task run with method.per_task adds one per task)."""

    task: str = "causal-lm"
    tokenizer: Any = None
    base_model_name: str = ""
    adapter: str = "default"


ApplyFn = Callable[[nn.Module, Any, MethodContext], None]
SaveFn = Callable[[nn.Module, Any, Path, MethodContext], None]
LoadFn = Callable[[nn.Module, Any, Path, MethodContext], None]
MergeFn = Callable[[nn.Module], nn.Module]
RouteFn = Callable[[nn.Module, Sequence[str]], AbstractContextManager[None]]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[MethodConfigBase]
    apply: ApplyFn
    save: SaveFn
    load: LoadFn
    # True when `save` writes a whole HF model: a run is then reloaded from final/ directly.
    saves_full_model: bool = False
    help: str = ""
    # model -> the same model with the method folded into plain weights (None: not mergeable).
    merge: MergeFn | None = None
    # (model, one adapter name per batch row) -> context manager routing each row (None: no named adapters).
    # A method with `route` can hold one adapter per task: `apply` with ctx.adapter adds that adapter (leaving it
    # trainable), `save`/`load` write and read it.
    route: RouteFn | None = None
    # Key prefix of modules_to_save tensors in the method's adapter files (PEFT LoRA: "base_model.model.", PEFT
    # prompt learning: "base_model."): a multi-task run adds each task's classification head to that task's files.
    saved_prefix: str | None = None
