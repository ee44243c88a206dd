"""Put bottleneck adapters into a model and manage its named adapters: add, switch, disable, delete, route rows.

Free functions on the HF model, as for LoRA; the bookkeeping is a `Registry` of `AdapterEntry` at
`model._sftlab_adapters`, and naming, switching and per-row routing are the shared rules of `.._adapters`.
Unlike LoRA, a new adapter stays frozen and unrouted until `set_adapter`.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from .. import _adapters as named
from .._adapters import Registry, SavedModule
from .adapter_map import InsertionPoint, find_insertion_points, out_features
from .config import AdapterConfig
from .layer import AdapterSwitch, BottleneckAdapter

ATTR = "_sftlab_adapters"


@dataclass
class AdapterEntry:
    """One adapter's record: its config and task, where it sits, what it saves whole, its resolved width."""

    cfg: AdapterConfig
    task: str
    points: list[InsertionPoint]
    modules_to_save: list[str]
    bottleneck: int


def adapters_of(model: nn.Module) -> Registry:
    """The model's adapter registry (an empty one, not attached, when it has none)."""
    return named.registry(model, ATTR) or Registry()


def hidden_size(model: nn.Module, points: Sequence[InsertionPoint]) -> int:
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(h) if h else int(out_features(model.get_submodule(points[0].name)))


def add_adapter(
    model: nn.Module, name: str, cfg: AdapterConfig, task: str = "causal-lm"
) -> list[InsertionPoint]:
    """Insert a new named adapter (frozen until `set_adapter(model, name)`); returns its insertion points."""
    reg = named.claim(model, ATTR, name)
    points = find_insertion_points(model, cfg.placement)
    m = cfg.bottleneck(hidden_size(model, points))
    for p in points:
        switch = named.wrap(model, p.name, AdapterSwitch, reg.active)
        w = switch.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        switch.adapters[name] = BottleneckAdapter(out_features(switch.base_layer), m, cfg, dtype, w.device)
    saved = named.resolve_saved(model, cfg.modules_to_save, task)
    for path in saved:
        named.wrap(model, path, SavedModule, reg.active).add_adapter(name)
    reg.add(name, AdapterEntry(cfg, task, points, saved, m), [p.name for p in points] + saved)
    named.activate(model, reg, reg.active)  # the new adapter is not routed to yet ...
    for s in named.switches(model, reg):
        for t in s.adapter_parameters(name):
            t.requires_grad_(False)  # ... nor trained
    return points


def set_adapter(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Route every switch through `name`; only its parameters train (base and other adapters frozen)."""
    reg = adapters_of(model)
    reg.require(name)
    named.activate(model, reg, name)
    named.train_only(model, reg, name if trainable else None)


def active_adapter(model: nn.Module) -> str | None:
    return adapters_of(model).active


class _RestoreRouting:
    """Returned by `disable_adapters`: used as a context manager, it re-activates the previous adapter on exit."""

    def __init__(self, model: nn.Module, previous: str | None):
        self.model, self.previous = model, previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        named.activate(self.model, adapters_of(self.model), self.previous)


def disable_adapters(model: nn.Module) -> _RestoreRouting:
    """Run the bare base model (exact base outputs): until `set_adapter` is called again, or, as
    `with disable_adapters(model): ...` (the LoRA API), until the block ends."""
    reg = adapters_of(model)
    previous = reg.active
    named.activate(model, reg, None)
    return _RestoreRouting(model, previous)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter; once none is left, the original modules are put back in place."""
    named.remove(model, adapters_of(model), name)


def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> AbstractContextManager[None]:
    """Each batch row i goes through adapter names[i] (None or "__base__": the bare base) at every switch."""
    return named.per_row(model, adapters_of(model), names)


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The adapter's parameters under their saved keys (see the package docstring)."""
    entry: AdapterEntry = adapters_of(model).require(name)
    out: dict[str, nn.Parameter] = {}
    for p in entry.points:
        for k, t in model.get_submodule(p.name).adapters[name].named_parameters():
            out[f"{p.name}.adapter.{k}"] = t
    for path in entry.modules_to_save:
        for k, t in model.get_submodule(path).modules_to_save[name].named_parameters():
            out[f"modules_to_save.{path}.{k}"] = t
    return out
