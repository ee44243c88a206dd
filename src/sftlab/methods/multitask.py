"""A multi-task model: its tasks, their own heads and adapters, and routing each batch row to its task's.

A run on `data.tasks` keeps a `TaskModel` record on the model (`model._sftlab_tasks`): the task names (in data.tasks
order: a batch's `task_ids` index them), each task's label names, and which named-adapter registries are keyed by
task name and so must be routed per row:
- per-task heads (seq-cls, `task_heads.TaskHeads`), one per task whatever the method; they train unless the method
  is freeze with train_head: false;
- per-task adapters (method.per_task: true; methods with named adapters: LoRA, bottleneck adapters): the method's
  `apply` runs once per task with `ctx.adapter` = the task's name, on the frozen base.
`rows(model, task_ids)` routes a batch: row i (or token i of a packed row) through its task's head and adapter, in
one forward and backward, so a task's head and adapter get gradient only from its own rows. `routed(model, task)`
routes a whole batch to one task (generation, evaluating one task). `save_task` writes one task as a single-task
final/ directory (its adapter, or the shared one, plus its head), which loads alone like any one-task run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _adapters as named
from ._adapters import Registry
from ._base import MethodContext, MethodSpec
from ._targets import TASK_HEAD_NAMES, task_head_modules
from .peft_format import add_saved_module
from .task_heads import TaskHeads

ATTR = "_sftlab_tasks"
HEADS_ATTR = "_sftlab_task_heads"  # a Registry: every task name lives in the one TaskHeads switch


@dataclass
class TaskModel:
    names: list[str]
    label_names: list[list[str] | None]
    head: str | None = None  # path of the TaskHeads module (seq-cls)
    per_task: bool = False  # one adapter per task
    routed: list[str] = field(default_factory=list)  # attributes of the registries keyed by task name

    def index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.names):
                raise KeyError(f"task index {task}: this model has {len(self.names)} tasks")
            return task
        if task not in self.names:
            raise KeyError(f"no task named {task!r}; this model has {', '.join(self.names)}")
        return self.names.index(task)


def tasks_of(model: nn.Module) -> TaskModel | None:
    return getattr(model, ATTR, None)


def _record(
    model: nn.Module, names: Sequence[str], label_names: Sequence[list[str] | None] | None
) -> TaskModel:
    rec = tasks_of(model)
    if rec is None:
        rec = TaskModel(list(names), list(label_names or [None] * len(names)))
        setattr(model, ATTR, rec)
    elif rec.names != list(names):
        raise ValueError(f"this model already has tasks {rec.names}, not {list(names)}")
    return rec


# ---- building -----------------------------------------------------------------------------------------------


def add_heads(model: nn.Module, names: Sequence[str], label_names: Sequence[list[str]]) -> str:
    """Replace the model's classification head with one fresh head per task (n_i = len(label_names[i]) outputs),
    initialised as the model initialises its head. Returns the head's path."""
    if any(not labels for labels in label_names):
        raise ValueError("per-task heads: every task needs its label names")
    paths = task_head_modules(model, "seq-cls")
    if len(paths) != 1:
        raise ValueError(
            f"per-task heads: expected one classification head ({', '.join(TASK_HEAD_NAMES)}) in "
            f"{type(model).__name__}, found {paths or 'none'}"
        )
    path = paths[0]
    sizes = {n: len(labels) for n, labels in zip(names, label_names)}
    heads = TaskHeads(model.get_submodule(path), sizes, getattr(model, "_init_weights", None))
    named.replace(model, path, heads)
    reg = Registry()
    for n, labels in zip(names, label_names):
        reg.add(n, list(labels), [path])
    setattr(model, HEADS_ATTR, reg)
    rec = _record(model, names, [list(x) for x in label_names])
    rec.head = path
    rec.routed.append(HEADS_ATTR)
    if getattr(model, "config", None) is not None:  # the widest label set: the padded logits' width
        model.config.num_labels = heads.width
    return path


def apply_method(
    model: nn.Module, spec: MethodSpec, cfg: Any, ctx: MethodContext, names: Sequence[str]
) -> None:
    """The run's method on a multi-task model: shared by every task, or (cfg.per_task) one adapter per task, all
    trainable at once; then the per-task heads train (unless freeze with train_head: false)."""
    rec = _record(model, names, None)
    probe = routed(model, names[0]) if rec.routed else nullcontext()  # an `apply` may probe with a forward
    if not cfg.per_task:
        with probe:
            spec.apply(model, cfg, ctx)
    else:
        if spec.route is None:
            raise ValueError(f"method.per_task: {spec.name} has no named adapters to give each task")
        with probe:
            for n in names:
                spec.apply(model, cfg, dataclasses.replace(ctx, adapter=n))
        attr, reg = next(
            (
                (a, r)
                for a, r in named.registries(model).items()
                if a != HEADS_ATTR and set(names) <= set(r.info)
            ),
            (None, None),
        )
        if reg is None:
            raise ValueError(f"method.per_task: {spec.name} added no named adapter per task")
        named.train_only(model, reg, list(names))
        named.activate(
            model, reg, None
        )  # outside `rows`/`routed` the bare base runs, never some task's adapter
        rec.per_task = True
        rec.routed.append(attr)
    if rec.head is not None:
        model.get_submodule(rec.head).requires_grad_(getattr(cfg, "train_head", True))


# ---- routing ------------------------------------------------------------------------------------------------


def routes(model: nn.Module) -> bool:
    """Whether the model has parts of its own per task (heads, adapters) that a batch must be routed through."""
    rec = tasks_of(model)
    return rec is not None and bool(rec.routed)


def rows(model: nn.Module, task_ids: torch.Tensor | None) -> AbstractContextManager[None]:
    """One forward where each row (task_ids (B,)) or each token of a packed row (task_ids (1, N)) goes through its
    task's head and adapter. Nothing to do (a null context) on a model without per-task parts."""
    if task_ids is None or not routes(model):
        return nullcontext()
    rec = tasks_of(model)
    names = [rec.names[i] for i in task_ids.flatten().tolist()]
    return _each(model, rec, lambda reg: named.per_row(model, reg, names))


def routed(model: nn.Module, task: str | int) -> AbstractContextManager[None]:
    """Inside the block every forward runs task `task`'s head and adapter for the whole batch."""
    rec = tasks_of(model)
    if rec is None:
        raise ValueError("this model has no tasks")
    name = rec.names[rec.index(task)]
    return _each(model, rec, lambda reg: named.routed(model, reg, name))


@contextmanager
def _each(model: nn.Module, rec: TaskModel, enter) -> Iterator[None]:
    regs = named.registries(model)
    with ExitStack() as stack:
        for attr in rec.routed:
            stack.enter_context(enter(regs[attr]))
        yield


def task_parameters(model: nn.Module, task: str) -> list[nn.Parameter]:
    """The tensors that are task `task`'s own: its head and (per_task) its adapter."""
    rec = tasks_of(model)
    rec.index(task)
    regs = named.registries(model)
    out: list[nn.Parameter] = []
    for attr in rec.routed:
        for s in named.switches(model, regs[attr]):
            out += list(s.adapter_parameters(task))
    return out


# ---- saving one task ----------------------------------------------------------------------------------------


def head_tensors(model: nn.Module, task: str) -> dict[str, torch.Tensor]:
    """Task `task`'s head under the plain model's keys ("<head path>.<param>")."""
    rec = tasks_of(model)
    heads: TaskHeads = model.get_submodule(rec.head)
    return {f"{rec.head}.{k}": v.detach() for k, v in heads.heads[task].state_dict().items()}


@contextmanager
def single_task(model: nn.Module, task: str) -> Iterator[None]:
    """Inside the block the model is task `task`'s plain seq-cls model: its own head in place of the per-task heads,
    and config.num_labels/id2label/label2id its label set (what `save_pretrained` writes)."""
    rec = tasks_of(model)
    i = rec.index(task)
    heads: TaskHeads = model.get_submodule(rec.head)
    config = model.config
    before = (config.id2label, config.label2id)
    labels = rec.label_names[i]
    named.replace(model, rec.head, heads.heads[task])
    config.id2label, config.label2id = dict(enumerate(labels)), {n: j for j, n in enumerate(labels)}
    try:
        yield
    finally:
        named.replace(model, rec.head, heads)
        config.id2label, config.label2id = before


def save_task(
    model: nn.Module, spec: MethodSpec, cfg: Any, ctx: MethodContext, out_dir: Path, task: str
) -> None:
    """Write task `task` as a one-task final/ directory: a full model with its head (full, freeze), or its adapter
    (per_task; else the shared one) with its head added as a module to save, in the method's own file layout."""
    rec = tasks_of(model)
    rec.index(task)
    ctx = dataclasses.replace(ctx, adapter=task) if rec.per_task else ctx
    if rec.head is None:
        spec.save(model, cfg, out_dir, ctx)
    elif spec.saves_full_model:
        with single_task(model, task):
            spec.save(model, cfg, out_dir, ctx)
    else:
        if spec.saved_prefix is None:
            raise ValueError(f"method {spec.name}: no layout for a saved head (MethodSpec.saved_prefix)")
        spec.save(model, cfg, out_dir, ctx)
        add_saved_module(out_dir, spec.saved_prefix, rec.head, head_tensors(model, task))
