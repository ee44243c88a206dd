"""Put LoRA layers into a model and manage its named adapters: add, switch, disable, delete, route rows, merge.

Everything is a free function on the HF model itself (no wrapper model): `model.base_model(...)`, `model(...)`,
`generate` and `save_pretrained` keep working. The bookkeeping lives in `model._sftlab_lora` (a `Registry` of
`LoraEntry`); naming, switching and per-row routing are the shared rules of `.._adapters`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from ...quant import dequantize_model
from .. import _adapters as named
from .._adapters import Registry, SavedModule, plain_modules
from .._targets import find_modules, freeze_all, task_head_modules
from .config import ALL_LINEAR, LoraConfig, default_targets
from .layer import TARGET_TYPES, LoraLayer

ATTR = "_sftlab_lora"


@dataclass
class LoraEntry:
    """One adapter's record: its config, the module paths it touches, and what adapter_config.json says."""

    config: LoraConfig
    targets: list[str]  # LoRA-wrapped module paths
    saved: list[str]  # modules_to_save paths
    target_spec: list[str] | str  # target_modules as written to adapter_config.json
    task: str


def lora_registry(model: nn.Module) -> Registry:
    reg = named.registry(model, ATTR)
    if reg is None:
        raise ValueError("this model has no LoRA adapters; apply the lora method or call add_adapter first")
    return reg


def lora_entry(model: nn.Module, name: str | None = None) -> tuple[str, LoraEntry]:
    """(name, record) of adapter `name` (default: the active one)."""
    reg = lora_registry(model)
    name = name or reg.active
    return name, reg.require(name)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield n, m


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def targetable_names(model: nn.Module) -> list[str]:
    """Leaf names of every module LoRA can wrap (what `target_modules` may list)."""
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in plain_modules(model) if isinstance(m, (*TARGET_TYPES, LoraLayer))}
    )


def resolve_targets(
    model: nn.Module, cfg: LoraConfig, exclude: list[str]
) -> tuple[list[str], list[str] | str]:
    """(module paths to wrap, target_modules as PEFT should read it back)."""
    mods = dict(plain_modules(model))
    ok = {n for n, m in mods.items() if isinstance(m, (*TARGET_TYPES, LoraLayer))}
    excluded = set(exclude)
    under_excluded = {n for n in mods if any(n == e or n.startswith(e + ".") for e in excluded)}
    if cfg.target_modules == ALL_LINEAR:
        names = sorted(ok - under_excluded)
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        exact = sorted(n for n in find_modules(model, leaves) if n in ok) == names
        spec: list[str] | str = leaves if exact else "(" + "|".join(re.escape(n) for n in names) + ")"
    else:
        patterns = cfg.target_modules if cfg.target_modules is not None else default_targets(model)
        names = [n for n in find_modules(model, patterns) if n in mods and n not in under_excluded]
        spec = patterns if isinstance(patterns, str) else sorted(patterns)
        bad = [n for n in names if n not in ok]
        if bad:
            kinds = sorted({type(mods[n]).__name__ for n in bad})
            raise ValueError(
                f"method.target_modules matched {bad[:5]} of type {', '.join(kinds)}; LoRA wraps only nn.Linear and "
                f"Conv1D. Module names that can be targeted: {', '.join(targetable_names(model))}"
            )
    if not names:
        raise ValueError(
            f"method.target_modules={cfg.target_modules!r} matched no module. "
            f"Module names that can be targeted: {', '.join(targetable_names(model))}"
        )
    return names, spec


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig, task: str = "causal-lm") -> None:
    """Add adapter `name` (LoRA layers + modules_to_save copies). The first adapter added becomes active."""
    reg = named.claim(model, ATTR, name)
    unmerge_adapter(model)
    save_paths = named.resolve_saved(model, cfg.modules_to_save, task)
    out_head = (
        _module_name(model, model.get_output_embeddings())
        if hasattr(model, "get_output_embeddings")
        else None
    )
    exclude = save_paths + task_head_modules(model, task) + ([out_head] if out_head else [])
    paths, spec = resolve_targets(model, cfg, exclude)
    for path in paths:
        named.wrap(model, path, LoraLayer, reg.active).add_adapter(name, cfg)
    for path in save_paths:
        named.wrap(model, path, SavedModule, reg.active).add_adapter(name)
    reg.add(name, LoraEntry(cfg, paths, save_paths, spec, task), paths + save_paths)
    set_adapter(model, reg.active or name)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter used by forward and the only one that trains."""
    reg = lora_registry(model)
    reg.require(name)
    if reg.active != name:
        unmerge_adapter(model)
    named.activate(model, reg, name)
    named.train_only(model, reg, name)


def adapter_names(model: nn.Module) -> list[str]:
    reg = named.registry(model, ATTR)
    return list(reg.info) if reg else []


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; wrappers left with no adapter are replaced by their original module."""
    reg = lora_registry(model)
    was_active = reg.active == name
    named.remove(model, reg, name)  # LoraLayer.delete_adapter unmerges and undoes PiSSA first
    if not reg.info:
        delattr(model, ATTR)
        freeze_all(model)
    elif was_active:
        set_adapter(model, next(iter(reg.info)))
    else:
        named.train_only(model, reg, reg.active)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base outputs (merged weights are unmerged first)."""
    unmerge_adapter(model)
    with named.disabled(model, lora_registry(model)):
        yield


@contextmanager
def adapter_per_row(model: nn.Module, names: list[str]) -> Iterator[None]:
    """One forward where batch row i uses adapter names[i] ('__base__' = none), like PEFT's adapter_names=."""
    reg = lora_registry(model)
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("adapter_per_row needs unmerged adapters; call unmerge_adapter(model) first")
    with named.per_row(model, reg, names):
        yield


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into the base weights: inference then costs what the base model costs."""
    active = lora_registry(model).active
    for _, layer in lora_layers(model):
        layer.merge(active)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo merge_adapter (W restored to ~1e-7 relative error in fp32)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return the plain HF model (original Linear/Conv1D with merged weights,
    modules_to_save replaced by the adapter's trained copy), ready for `save_pretrained` and `from_pretrained`.
    Used by `sftlab merge RUN_DIR OUT_DIR` through the method's `merge` slot. A quantised base (model.quantize) is
    decoded first and merged in its original precision: the result is an ordinary full-precision model."""
    dequantize_model(model)
    merge_adapter(model)
    for path, m in list(plain_modules(model)):
        if isinstance(m, LoraLayer):
            named.replace(model, path, m.base_layer)
        elif isinstance(m, SavedModule):
            m.disabled = False
            named.replace(model, path, m.module())
    if hasattr(model, ATTR):
        delattr(model, ATTR)
    freeze_all(model)
    return model
