"""Shared helpers for methods: find modules by name, freeze, count parameters, locate blocks and heads."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

# Heads that a task adds fresh (random init) and that must therefore train with any PEFT method.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def name_matches(name: str, patterns: str | Iterable[str]) -> bool:
    """PEFT semantics: a string is a full-match regex on the module path; a list matches name suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_modules(model: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and name_matches(n, patterns)]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def is_task_heads(module: nn.Module) -> bool:
    """A multi-task run's per-task heads (`task_heads.TaskHeads`): trained and saved per task by the multi-task
    layer, never copied whole into a method's modules_to_save."""
    return getattr(module, "per_task_heads", False)


def task_head_modules(model: nn.Module, task: str) -> list[str]:
    """Names of freshly initialised task heads (seq-cls) that should be trained and saved with an adapter."""
    if task != "seq-cls":
        return []
    return [
        n for n, m in model.named_modules() if n.split(".")[-1] in TASK_HEAD_NAMES and not is_task_heads(m)
    ]


def unfreeze_modules(model: nn.Module, names: Iterable[str]) -> None:
    for n in names:
        for p in model.get_submodule(n).parameters():
            p.requires_grad_(True)


def block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The ModuleLists that hold transformer blocks (decoder layers, encoder layers, T5 blocks)."""
    found = []
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod) > 0
            and name.split(".")[-1] in ("layers", "layer", "h", "block")
        ):
            found.append((name, mod))
    return found


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting shared tensors once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
