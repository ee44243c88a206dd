"""Put LoRA layers into a model and manage its named adapters: add, switch, disable, delete, route rows, merge.

Everything is a free function on the HF model itself (no wrapper model): `model.base_model(...)`, `model(...)`,
`generate` and `save_pretrained` keep working. The bookkeeping lives in `model._sftlab_lora` (a LoraState).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from .._targets import TASK_HEAD_NAMES, find_modules, freeze_all, get_submodule_parent, task_head_modules
from .config import ALL_LINEAR, LoraConfig, default_targets
from .layer import BASE, TARGET_TYPES, LoraLayer, SavedModule

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class LoraState:
    """Per-model bookkeeping: each adapter's config, the module paths it touches, and the active one."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)  # LoRA-wrapped module paths
    saved: dict[str, list[str]] = field(default_factory=dict)  # modules_to_save paths
    target_spec: dict[str, list[str] | str] = field(default_factory=dict)  # as written to adapter_config.json
    task: dict[str, str] = field(default_factory=dict)
    active: str | None = None


def lora_state(model: nn.Module) -> LoraState:
    st = getattr(model, "_sftlab_lora", None)
    if st is None:
        raise ValueError("this model has no LoRA adapters; apply the lora method or call add_adapter first")
    return st


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield n, m


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | SavedModule]:
    for m in model.modules():
        if isinstance(m, (LoraLayer, SavedModule)):
            yield m


def _plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules, hiding the insides of our wrappers (so `q_proj.base_layer` is never a target)."""
    hidden: list[str] = []
    for n, m in model.named_modules():
        if not n or any(n.startswith(h + ".") for h in hidden):
            continue
        if isinstance(m, (LoraLayer, SavedModule)):
            hidden.append(n)
        yield n, m


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def targetable_names(model: nn.Module) -> list[str]:
    """Leaf names of every module LoRA can wrap (what `target_modules` may list)."""
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in _plain_modules(model) if isinstance(m, (*TARGET_TYPES, LoraLayer))}
    )


def resolve_targets(
    model: nn.Module, cfg: LoraConfig, exclude: list[str]
) -> tuple[list[str], list[str] | str]:
    """(module paths to wrap, target_modules as PEFT should read it back)."""
    mods = dict(_plain_modules(model))
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


def resolve_modules_to_save(model: nn.Module, cfg: LoraConfig, task: str) -> list[str]:
    if cfg.modules_to_save is None:
        return task_head_modules(model, task)
    mods = dict(_plain_modules(model))
    found: list[str] = []
    for want in cfg.modules_to_save:
        hits = [n for n in mods if n == want or n.endswith("." + want)]
        if not hits and want not in TASK_HEAD_NAMES:  # PEFT lists classifier+score for every seq-cls model
            raise ValueError(f"method.modules_to_save: no module named {want!r} in this model")
        found += [h for h in hits if h not in found]
    return found


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, path)
    setattr(parent, child, new)


def _wrapped(
    model: nn.Module, path: str, cls: type[LoraLayer] | type[SavedModule], active: str | None
) -> LoraLayer | SavedModule:
    """The wrapper of type `cls` at `path`, wrapping the plain module there on first use (following `active`)."""
    mod = model.get_submodule(path)
    if not isinstance(mod, cls):
        mod = cls(mod)
        mod.active = active
        _replace(model, path, mod)
    return mod


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig, task: str = "causal-lm") -> None:
    """Add adapter `name` (LoRA layers + modules_to_save copies). The first adapter added becomes active."""
    if not _NAME_RE.match(name) or name == BASE:
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' or '-' (and not {BASE!r})")
    st: LoraState | None = getattr(model, "_sftlab_lora", None)
    if st is None:
        st = LoraState()
        model._sftlab_lora = st
    if name in st.configs:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter first or pick another name")
    unmerge_adapter(model)
    save_paths = resolve_modules_to_save(model, cfg, task)
    out_head = (
        _module_name(model, model.get_output_embeddings())
        if hasattr(model, "get_output_embeddings")
        else None
    )
    exclude = save_paths + task_head_modules(model, task) + ([out_head] if out_head else [])
    paths, spec = resolve_targets(model, cfg, exclude)
    for path in paths:
        _wrapped(model, path, LoraLayer, st.active).add_adapter(name, cfg)
    for path in save_paths:
        _wrapped(model, path, SavedModule, st.active).add_adapter(name)
    st.configs[name], st.targets[name], st.saved[name], st.target_spec[name] = cfg, paths, save_paths, spec
    st.task[name] = task
    set_adapter(model, st.active or name)


def _refresh_trainable(model: nn.Module) -> None:
    """Exactly the active adapter's tensors train; the base (and other adapters) stay frozen."""
    freeze_all(model)
    active = lora_state(model).active
    for m in _wrappers(model):
        if isinstance(m, LoraLayer):
            for d in (m.lora_A, m.lora_B, m.lora_magnitude_vector):
                if active in d:
                    d[active].requires_grad_(True)
        elif active in m.modules_to_save:
            m.modules_to_save[active].requires_grad_(True)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make `name` the adapter used by forward and the only one that trains."""
    st = lora_state(model)
    if name not in st.configs:
        raise KeyError(f"no adapter named {name!r}; have {', '.join(st.configs) or 'none'}")
    if st.active != name:
        unmerge_adapter(model)
    st.active = name
    for m in _wrappers(model):
        m.active = name
    _refresh_trainable(model)


def adapter_names(model: nn.Module) -> list[str]:
    st = getattr(model, "_sftlab_lora", None)
    return list(st.configs) if st else []


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; wrappers left with no adapter are replaced by their original module."""
    st = lora_state(model)
    if name not in st.configs:
        raise KeyError(f"no adapter named {name!r}; have {', '.join(st.configs)}")
    for path in st.targets[name]:
        layer = model.get_submodule(path)
        layer.delete_adapter(name)
        if not layer.adapter_names():
            _replace(model, path, layer.base_layer)
    for path in st.saved[name]:
        mod = model.get_submodule(path)
        mod.delete_adapter(name)
        if not mod.adapter_names():
            _replace(model, path, mod.original_module)
    for d in (st.configs, st.targets, st.saved, st.target_spec, st.task):
        d.pop(name, None)
    if st.active == name:
        st.active = None
        if st.configs:
            set_adapter(model, next(iter(st.configs)))
    if not st.configs:
        del model._sftlab_lora
        freeze_all(model)
    else:
        _refresh_trainable(model)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base outputs (merged weights are unmerged first)."""
    unmerge_adapter(model)
    wrappers = list(_wrappers(model))
    for m in wrappers:
        m.disabled = True
    try:
        yield
    finally:
        for m in wrappers:
            m.disabled = False


@contextmanager
def adapter_per_row(model: nn.Module, names: list[str]) -> Iterator[None]:
    """One forward where batch row i uses adapter names[i] ('__base__' = none), like PEFT's adapter_names=."""
    st = lora_state(model)
    unknown = sorted({n for n in names if n != BASE and n not in st.configs})
    if unknown:
        raise KeyError(
            f"adapter_per_row: unknown adapters {unknown}; have {', '.join(st.configs)} and {BASE!r}"
        )
    if any(layer.merged for _, layer in lora_layers(model)):
        raise RuntimeError("adapter_per_row needs unmerged adapters; call unmerge_adapter(model) first")
    wrappers = list(_wrappers(model))
    for m in wrappers:
        m.row_adapters = list(names)
    try:
        yield
    finally:
        for m in wrappers:
            m.row_adapters = None


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into the base weights: inference then costs what the base model costs."""
    active = lora_state(model).active
    for _, layer in lora_layers(model):
        layer.merge(active)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo merge_adapter (W restored to ~1e-7 relative error in fp32)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and return the plain HF model (original Linear/Conv1D with merged weights,
    modules_to_save replaced by the adapter's trained copy), ready for `save_pretrained` and `from_pretrained`.
    Used by `sftlab merge RUN_DIR OUT_DIR`."""
    merge_adapter(model)
    for path, m in list(_plain_modules(model)):
        if isinstance(m, LoraLayer):
            _replace(model, path, m.base_layer)
        elif isinstance(m, SavedModule):
            m.disabled = False
            _replace(model, path, m.current())
    if hasattr(model, "_sftlab_lora"):
        del model._sftlab_lora
    freeze_all(model)
    return model
