"""One classification head per task on a shared body (MT-DNN): the module that replaces a seq-cls model's head.

`TaskHeads` holds one head per task, each a fresh copy of the model's own head (`classifier`, `score`) with the
task's label count n_i, initialised as the model initialises its head. It is a `Switch` whose alternatives are the
tasks: `row_names` routes each row to its task's head (a mixed batch, set by the multi-task layer from the batch's
task ids), `active` routes the whole batch. Its output is (B, ..., C), C = max n_i: a row's columns beyond its task's
n_i hold the most negative finite value, so softmax gives them probability 0 and cross-entropy and argmax over the
row are exactly those of its own head's n_i logits. A head runs only on its own rows, so it gets no gradient from
another task's rows. Being a switch also hides the heads from a method's targets (LoRA's all-linear) and from its
modules_to_save: the multi-task layer trains and saves them per task.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ._adapters import Switch, row_groups


def fresh_head(template: nn.Module, n: int, init: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """A copy of `template` whose output layer (it, or its last Linear) has n outputs, re-initialised."""
    if isinstance(template, nn.Linear):
        w = template.weight
        head: nn.Module = nn.Linear(template.in_features, n, template.bias is not None, w.device, w.dtype)
    else:
        head = copy.deepcopy(template)
        path, last = next(
            ((p, m) for p, m in reversed(list(head.named_modules())) if isinstance(m, nn.Linear)),
            (None, None),
        )
        if last is None:
            raise ValueError(
                f"{type(template).__name__}: no Linear output layer to give one output per label"
            )
        w = last.weight
        parent_path, _, child = path.rpartition(".")
        parent = head.get_submodule(parent_path) if parent_path else head
        setattr(parent, child, nn.Linear(last.in_features, n, last.bias is not None, w.device, w.dtype))
    if init is not None:
        head.apply(init)
    return head


class TaskHeads(Switch):
    """Per-task classification heads, routed per row (see the module docstring)."""

    table = "heads"
    per_task_heads = True  # _targets.is_task_heads

    def __init__(
        self, template: nn.Module, sizes: dict[str, int], init: Callable[[nn.Module], None] | None = None
    ):
        super().__init__()
        self.heads = nn.ModuleDict({name: fresh_head(template, n, init) for name, n in sizes.items()})
        self.sizes = dict(sizes)
        self.width = max(sizes.values())

    def unwrapped(self) -> nn.Module:
        raise RuntimeError("per-task heads cannot be removed; there is no shared head to put back")

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.row_names
        if names is None:
            name = self.current()
            if name is None:
                raise RuntimeError(
                    f"per-task heads ({', '.join(self.heads)}): no task routed for this forward; a batch needs "
                    "`task_ids` (the training objective routes them), or run it inside multitask.routed(model, task)"
                )
            names = [name] * x.shape[0]
        if len(names) != x.shape[0]:
            raise ValueError(f"per-task heads: {len(names)} task names for a batch of {x.shape[0]} rows")
        out = None
        for name, idx in row_groups(names, x.device).items():
            y = self.heads[name](x[idx], *args, **kwargs)  # (n, ..., n_task)
            if out is None:  # (B, ..., C); columns past a task's labels: never chosen, probability 0
                out = y.new_full((x.shape[0], *y.shape[1:-1], self.width), torch.finfo(y.dtype).min)
            out[idx, ..., : y.shape[-1]] = y
        return out

    def extra_repr(self) -> str:
        return f"tasks={self.sizes}"
