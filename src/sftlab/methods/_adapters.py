"""Named adapters, one layer for every PEFT method: naming, switching, per-row routing, modules_to_save.

A method wraps base modules in *switches*: LoRA's `LoraLayer`, the bottleneck adapter's `AdapterSwitch`, and
`SavedModule` (modules_to_save) for all of them. A switch holds one alternative per adapter name and three
routing fields: `active` (the name the whole batch uses), `disabled` (run the bare base) and `row_names` (a mixed
batch: row i uses row_names[i]). A per-model `Registry` records which switches each name lives in; the free
functions below keep every switch of a method in step, so LoRA and adapters share one set of rules for names,
set/disable/delete and per-row routing, and a multi-task batch is grouped by name in one place (`mix_rows`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._targets import TASK_HEAD_NAMES, freeze_all, get_submodule_parent, is_task_heads, task_head_modules

BASE_ROW = "__base__"  # row name meaning "no adapter" in a mixed batch (PEFT's convention)
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_name(name: str) -> None:
    """Adapter names become state-dict key parts: letters, digits, '_' and '-' only, never the base row's name."""
    if not _NAME_RE.match(name) or name == BASE_ROW:
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-' (and not {BASE_ROW!r})")


# ---- per-row routing ------------------------------------------------------------------------------------------


def row_groups(names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's rows grouped by adapter name: {name: row indices (n,)}, names in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    return {n: torch.tensor(idx, device=device) for n, idx in groups.items()}


Index = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def name_groups(names: Sequence[str], shape: torch.Size, device: torch.device) -> dict[str, Index]:
    """{name: index} for a tensor of `shape` (B, ...): one name per row (index: rows (n,)), or one per token of
    (B, T, ...) (a packed row holds examples of several tasks; index: (rows (n,), positions (n,)), flattened
    row-major). Either index selects (n, ...) with `x[index]` and assigns with `out[index] = ...`."""
    b = shape[0]
    if len(names) == b:
        return row_groups(names, device)
    if len(shape) > 2 and len(names) == b * shape[1]:
        t = shape[1]
        return {n: (flat // t, flat % t) for n, flat in row_groups(names, device).items()}
    raise ValueError(f"adapter_per_row: {len(names)} names for a batch of {b} rows of {tuple(shape[1:-1])}")


def mix_rows(
    base: torch.Tensor, names: Sequence[str], branch: Callable[[str, Index], torch.Tensor | None]
) -> torch.Tensor:
    """`base` (B, ...) with each name's rows (or tokens, see `name_groups`) replaced by branch(name, index) (None:
    that name keeps the base rows).

    Every switch routes a mixed batch through this, so a row's (token's) result does not depend on its neighbours."""
    out = base.clone()
    for name, idx in name_groups(names, base.shape, base.device).items():
        rows = None if name == BASE_ROW else branch(name, idx)
        if rows is not None:
            out[idx] = rows  # (n, ...)
    return out


# ---- switches -------------------------------------------------------------------------------------------------


class Switch(nn.Module):
    """A base module plus one alternative per adapter name, kept in the nn.ModuleDict named by `table`.

    Subclasses say what to put back once no adapter is left (`unwrapped`); LoRA, whose adapters are
    tensors rather than modules, overrides the three table methods too."""

    table = ""

    def __init__(self) -> None:
        super().__init__()
        self.active: str | None = None
        self.disabled = False
        self.row_names: list[str] | None = None

    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.table).keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The tensors that train while `name` is the active adapter."""
        held = getattr(self, self.table)
        return held[name].parameters() if name in held else iter(())

    def delete_adapter(self, name: str) -> None:
        held = getattr(self, self.table)
        if name in held:
            del held[name]
        if self.active == name:
            self.active = None

    def unwrapped(self) -> nn.Module:
        """The module to put back in place once no adapter is left."""
        raise NotImplementedError

    def current(self) -> str | None:
        """The name the whole batch uses now (None: the base), when no per-row names are set."""
        return None if self.disabled or self.active not in self.adapter_names() else self.active


class SavedModule(Switch):
    """modules_to_save: a frozen original plus one trainable full copy per adapter (PEFT's in-model layout,
    `<path>.original_module.*` and `<path>.modules_to_save.<name>.*`). The one copy-a-module implementation:
    LoRA, bottleneck adapters and the prompt-learning methods all train a fresh seq-cls head through it."""

    table = "modules_to_save"

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str) -> nn.Module:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        if self.active is None:
            self.active = name
        return self.modules_to_save[name]

    def unwrapped(self) -> nn.Module:
        return self.original_module

    def module(self) -> nn.Module:
        """The module that runs for the whole batch now: the active copy, or the original."""
        name = self.current()
        return self.original_module if name is None else self.modules_to_save[name]

    @property
    def weight(self) -> torch.Tensor:
        return self.module().weight

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.row_names is None:
            return self.module()(x, *args, **kwargs)
        copies = self.modules_to_save
        return mix_rows(
            self.original_module(x, *args, **kwargs),
            self.row_names,
            lambda n, idx: copies[n](x[idx], *args, **kwargs) if n in copies else None,
        )


def plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules, hiding the insides of switches (so `q_proj.base_layer` is never a target)."""
    hidden: list[str] = []
    for n, m in model.named_modules():
        if not n or any(n.startswith(h + ".") for h in hidden):
            continue
        if isinstance(m, Switch):
            hidden.append(n)
        yield n, m


def resolve_saved(model: nn.Module, wanted: list[str] | None, task: str) -> list[str]:
    """Paths of the modules_to_save: `wanted` as name suffixes, or by default the task's fresh head."""
    if wanted is None:
        return task_head_modules(model, task)
    mods = [n for n, m in plain_modules(model) if not is_task_heads(m)]
    found: list[str] = []
    for want in wanted:
        hits = [n for n in mods if n == want or n.endswith("." + want)]
        if not hits and want not in TASK_HEAD_NAMES:  # PEFT lists classifier+score for every seq-cls model
            raise ValueError(f"method.modules_to_save: no module named {want!r} in {type(model).__name__}")
        found += [h for h in hits if h not in found]
    return found


def wrap(
    model: nn.Module, path: str, make: Callable[[nn.Module], Switch], active: str | None = None
) -> Switch:
    """The switch at `path`, wrapping the plain module there on first use (routed to `active`)."""
    mod = model.get_submodule(path)
    if isinstance(mod, Switch):
        return mod
    switch = make(mod)
    switch.active = active
    replace(model, path, switch)
    return switch


def replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def saved_copy(model: nn.Module, path: str, name: str = "default") -> nn.Module:
    """The trainable copy `name` of the module at `path`, made (and routed to) on first use."""
    switch = wrap(model, path, SavedModule)
    if not isinstance(switch, SavedModule):
        raise TypeError(
            f"{path} is already wrapped by {type(switch).__name__}; it cannot also be saved whole"
        )
    if name not in switch.modules_to_save:
        switch.add_adapter(name)
    return switch.modules_to_save[name]


# ---- per-model bookkeeping ------------------------------------------------------------------------------------


@dataclass
class Registry:
    """One method's named adapters on one model: each name's record and switch paths, and the active name."""

    info: dict[str, Any] = field(default_factory=dict)  # name -> the method's own record (config, task, ...)
    paths: dict[str, list[str]] = field(default_factory=dict)  # name -> paths of the switches holding it
    active: str | None = None

    def add(self, name: str, info: Any, paths: list[str]) -> None:
        self.info[name], self.paths[name] = info, list(paths)

    def require(self, name: str) -> Any:
        if name not in self.info:
            raise KeyError(f"no adapter named {name!r}; this model has {', '.join(self.info) or 'none'}")
        return self.info[name]


def registry(model: nn.Module, attr: str) -> Registry | None:
    """The registry a method keeps on the model at `attr` (one attribute per method), if any."""
    return getattr(model, attr, None)


def claim(model: nn.Module, attr: str, name: str) -> Registry:
    """The registry at `attr` (made on first use), once `name` is known to be valid and free."""
    check_name(name)
    reg = registry(model, attr)
    if reg is None:
        reg = Registry()
        setattr(model, attr, reg)
    if name in reg.info:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter first or pick another name")
    return reg


def switches(model: nn.Module, reg: Registry) -> Iterator[Switch]:
    """Every switch any adapter of `reg` lives in, each once."""
    seen = dict.fromkeys(p for paths in reg.paths.values() for p in paths)
    for path in seen:
        yield model.get_submodule(path)


def activate(model: nn.Module, reg: Registry, name: str | None) -> None:
    """Route every switch through `name` (None: the base) for the whole batch."""
    reg.active = name
    for s in switches(model, reg):
        s.active = name


def train_only(model: nn.Module, reg: Registry, name: str | Sequence[str] | None) -> None:
    """Exactly adapter `name`'s tensors train (or those of each name in a list: one adapter per task); the base and
    every other adapter stay frozen."""
    freeze_all(model)
    names = [] if name is None else [name] if isinstance(name, str) else list(name)
    for s in switches(model, reg):
        for n in names:
            for p in s.adapter_parameters(n):
                p.requires_grad_(True)


@contextmanager
def _held(model: nn.Module, reg: Registry, attr: str, value: Any, reset: Any) -> Iterator[None]:
    """Every switch has `attr` = value inside the block, and `reset` after it."""
    held = list(switches(model, reg))
    for s in held:
        setattr(s, attr, value)
    try:
        yield
    finally:
        for s in held:
            setattr(s, attr, reset)


def disabled(model: nn.Module, reg: Registry) -> AbstractContextManager[None]:
    """Inside the block every switch runs its bare base module."""
    return _held(model, reg, "disabled", True, False)


@contextmanager
def per_row(model: nn.Module, reg: Registry, names: Sequence[str | None]) -> Iterator[None]:
    """One forward where batch row i uses adapter names[i] (BASE_ROW or None: the bare base)."""
    rows = [BASE_ROW if n is None else n for n in names]
    unknown = sorted({n for n in rows if n != BASE_ROW and n not in reg.info})
    if unknown:
        raise KeyError(
            f"adapter_per_row: no adapter named {unknown[0]!r}; have {', '.join(reg.info) or 'none'} and {BASE_ROW!r}"
        )
    with _held(model, reg, "row_names", rows, None):
        yield


@contextmanager
def routed(model: nn.Module, reg: Registry, name: str | None) -> Iterator[None]:
    """Inside the block the whole batch uses adapter `name` (routing only: what trains is unchanged); each switch's
    routing is restored after it."""
    if name is not None:
        reg.require(name)
    held = list(switches(model, reg))
    before = [(s.active, s.row_names) for s in held]
    for s in held:
        s.active, s.row_names = name, None
    try:
        yield
    finally:
        for s, (active, rows) in zip(held, before):
            s.active, s.row_names = active, rows


def registries(model: nn.Module) -> dict[str, Registry]:
    """Every method's named-adapter registry on the model, by attribute."""
    return {k: v for k, v in vars(model).items() if isinstance(v, Registry)}


def remove(model: nn.Module, reg: Registry, name: str) -> None:
    """Drop adapter `name` from its switches and the registry; switches left empty give back their module.
    If it was active, nothing is active afterwards."""
    reg.require(name)
    for path in reg.paths[name]:
        s = model.get_submodule(path)
        s.delete_adapter(name)
        if not s.adapter_names():
            replace(model, path, s.unwrapped())
    del reg.info[name], reg.paths[name]
    if reg.active == name:
        activate(model, reg, None)
