"""Bottleneck adapters (Houlsby / Pfeiffer): a small residual MLP on sub-layer outputs, base frozen.

Each insertion point is a block's attention-output or FFN-output projection (see `adapter_map`). The
projection is wrapped so that, with h its output (before the block's residual add),

    h_out = h + W_up · dropout(act(W_down · LN(h)))        LN only when layer_norm: true

Houlsby puts one after every attention output (self- and cross-attention) and one after every FFN output;
Pfeiffer only after the FFN output. W_up and its bias start at zero, so at step 0 the model is exactly the
base; W_down is small random (nn.Linear default init). Several named adapters can live on one base
(`add_adapter`, `set_adapter`, `disable_adapters`, `delete_adapter`), and `adapter_per_row` routes each row
of a batch through its own adapter, in inference and training alike.

Saved format (our own; PEFT has no bottleneck adapters). A directory with two files:

`adapter_config.json`::

    {
      "format": "sftlab-bottleneck-adapter", "format_version": 1,
      "method": "adapter",
      "placement": "houlsby" | "pfeiffer",
      "reduction_factor": 16.0 | null,      # as configured; null when bottleneck_size was given
      "bottleneck_size": 4,                 # resolved m actually used at every point
      "activation": "relu" | "gelu" | "silu",
      "dropout": 0.0, "init": "zero-up", "layer_norm": false,
      "hidden_size": 64,                    # the base's hidden size d
      "model_type": "llama",                # base config.model_type; loading checks it
      "base_model_name_or_path": "tiny-llama",
      "task": "causal-lm",
      "insertion_points": ["model.layers.0.self_attn.o_proj", ...],   # module paths in the base
      "insertion_kinds": ["attn", "ffn", ...],                         # parallel to insertion_points
      "modules_to_save": ["classifier"]     # modules saved whole (trained copies), e.g. a task head
    }

`adapter_model.safetensors`: only these tensors (float32 unless trained in another dtype)::

    <point>.adapter.down.weight  (m, d)     <point>.adapter.down.bias  (m,)
    <point>.adapter.up.weight    (d, m)     <point>.adapter.up.bias    (d,)
    <point>.adapter.norm.weight  (d,)       <point>.adapter.norm.bias  (d,)     only with layer_norm
    modules_to_save.<module>.<param>        e.g. modules_to_save.classifier.weight

Trainable parameters per point: (d·m + m) + (m·d + d) (+ 2d with layer_norm); see `adapter_param_count`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ._base import MethodConfigBase, MethodContext, MethodSpec
from ._targets import find_modules, freeze_all, get_submodule_parent, task_head_modules
from .adapter_map import InsertionPoint, find_insertion_points, out_features
from .peft_format import read_adapter, write_adapter

FORMAT = "sftlab-bottleneck-adapter"
DEFAULT_REDUCTION = 16.0
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class AdapterConfig(MethodConfigBase):
    name: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN outputs; pfeiffer: after FFN outputs only."
    )
    reduction_factor: float | None = Field(None, gt=0, description="Bottleneck = hidden / this (default 16).")
    bottleneck_size: int | None = Field(
        None, ge=1, description="Bottleneck width; overrides reduction_factor."
    )
    activation: Literal["relu", "gelu", "silu"] = Field(
        "relu", description="Non-linearity in the bottleneck."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after the activation (training only).")
    init: Literal["zero-up"] = Field("zero-up", description="W_up = 0: the model equals the base at step 0.")
    layer_norm: bool = Field(False, description="A LayerNorm on the adapter input (2·hidden more params).")
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained and saved whole with the adapter (name suffixes, e.g. 'classifier'); "
        "default: the fresh task head for seq-cls, nothing otherwise.",
    )

    @model_validator(mode="after")
    def _one_size(self):
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("method: set reduction_factor or bottleneck_size, not both")
        return self

    def bottleneck(self, hidden: int) -> int:
        rf = self.reduction_factor or DEFAULT_REDUCTION
        return self.bottleneck_size or max(1, round(hidden / rf))


def adapter_param_count(hidden: int, bottleneck: int, n_points: int, layer_norm: bool = False) -> int:
    """Trainable parameters of one adapter: per point (d·m + m) + (m·d + d) (+ 2d), times points."""
    d, m = hidden, bottleneck
    return n_points * ((d * m + m) + (m * d + d) + (2 * d if layer_norm else 0))


class BottleneckAdapter(nn.Module):
    """x (..., d) -> W_up · dropout(act(W_down · LN(x))) (..., d); the caller adds the residual."""

    def __init__(self, hidden: int, bottleneck: int, cfg: AdapterConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, dtype=dtype, device=device) if cfg.layer_norm else None
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.drop = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.down.weight.dtype)  # adapters may stay fp32 on a bf16 base
        if self.norm is not None:
            h = self.norm(h)
        return self.up(self.drop(self.act(self.down(h)))).to(x.dtype)


class AdapterSwitch(nn.Module):
    """Wraps one base module and routes through a named alternative, for the whole batch or per row.

    mode "residual" (insertion points): y = base(x); y + adapters[name](y).
    mode "replace" (modules_to_save): y = adapters[name](x), a trainable copy of the base module.
    With no active name (or a name this switch does not hold) the base module runs untouched.
    """

    def __init__(self, base_layer: nn.Module, mode: Literal["residual", "replace"]):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.mode = mode
        self.active: str | None = None
        self.row_names: list[str | None] | None = None

    def __getattr__(self, name: str):
        # Model code reads e.g. `self.wo.weight.dtype` (T5) or `c_proj.nf` (GPT-2): answer from the base.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    def _pick(self, name: str | None) -> nn.Module | None:
        return self.adapters[name] if name is not None and name in self.adapters else None

    def _one(
        self, name: str | None, x: torch.Tensor, y: torch.Tensor | None, *args, **kwargs
    ) -> torch.Tensor:
        mod = self._pick(name)
        if self.mode == "residual":
            return y if mod is None else y + mod(y)
        return (mod or self.base_layer)(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs) if self.mode == "residual" else None
        if self.row_names is None:
            return self._one(self.active, x, y, *args, **kwargs)
        rows = self.row_names
        if x.shape[0] != len(rows):
            raise ValueError(f"adapter_per_row: {len(rows)} names for a batch of {x.shape[0]} rows")
        groups: dict[str | None, list[int]] = {}
        for i, n in enumerate(rows):
            groups.setdefault(n, []).append(i)
        order: list[int] = []
        parts: list[torch.Tensor] = []
        for n, idx in groups.items():
            ix = torch.tensor(idx, device=x.device)
            parts.append(self._one(n, x[ix], None if y is None else y[ix]))  # (b_n, ..., d)
            order.extend(idx)
        inv = torch.empty(len(order), dtype=torch.long, device=x.device)
        inv[torch.tensor(order, device=x.device)] = torch.arange(len(order), device=x.device)
        return torch.cat(parts)[inv]  # rows back in batch order


# ---- named adapters on one base ------------------------------------------------------------------


def _registry(model: nn.Module) -> dict[str, dict]:
    """Per-model record of adapters: name -> {cfg, task, points, modules_to_save, bottleneck}."""
    if not hasattr(model, "_sftlab_adapters"):
        model._sftlab_adapters = {}
    return model._sftlab_adapters


def _switches(model: nn.Module) -> Iterator[tuple[str, AdapterSwitch]]:
    for path, mod in model.named_modules():
        if isinstance(mod, AdapterSwitch):
            yield path, mod


def _wrap(model: nn.Module, path: str, mode: str) -> AdapterSwitch:
    mod = model.get_submodule(path)
    if isinstance(mod, AdapterSwitch):
        return mod
    parent, child = get_submodule_parent(model, path)
    switch = AdapterSwitch(mod, mode)
    setattr(parent, child, switch)
    return switch


def _hidden_size(model: nn.Module, points: Sequence[InsertionPoint]) -> int:
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    return int(h) if h else int(out_features(model.get_submodule(points[0].name)))


def _resolve_modules_to_save(model: nn.Module, cfg: AdapterConfig, task: str) -> list[str]:
    wanted = task_head_modules(model, task) if cfg.modules_to_save is None else cfg.modules_to_save
    names: list[str] = []
    for w in wanted:
        hits = [
            n for n in find_modules(model, [w]) if ".adapters." not in n and not n.endswith(".base_layer")
        ]
        if not hits:
            raise ValueError(f"method.modules_to_save: no module named {w!r} in {type(model).__name__}")
        names.extend(h for h in hits if h not in names)
    return names


def add_adapter(
    model: nn.Module, name: str, cfg: AdapterConfig, task: str = "causal-lm"
) -> list[InsertionPoint]:
    """Insert a new named adapter (frozen until `set_adapter(model, name)`); returns its insertion points."""
    reg = _registry(model)
    if name in reg:
        raise ValueError(f"adapter {name!r} already exists on this model; delete_adapter it first")
    points = find_insertion_points(model, cfg.placement)
    hidden = _hidden_size(model, points)
    m = cfg.bottleneck(hidden)
    for p in points:
        switch = _wrap(model, p.name, "residual")
        w = switch.base_layer.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        switch.adapters[name] = BottleneckAdapter(out_features(switch.base_layer), m, cfg, dtype, w.device)
    saved = _resolve_modules_to_save(model, cfg, task)
    for path in saved:
        switch = _wrap(model, path, "replace")
        switch.adapters[name] = copy.deepcopy(switch.base_layer)
    for _, s in _switches(model):
        if name in s.adapters:
            s.adapters[name].requires_grad_(False)
    reg[name] = {"cfg": cfg, "task": task, "points": points, "modules_to_save": saved, "bottleneck": m}
    return points


BASE_ROW = "__base__"  # same spelling as LoRA's adapter_per_row


def _check_name(model: nn.Module, name: str) -> None:
    if name not in _registry(model):
        raise KeyError(f"no adapter named {name!r}; this model has {sorted(_registry(model)) or 'none'}")


def set_adapter(model: nn.Module, name: str, trainable: bool = True) -> None:
    """Route every switch through `name`; only its parameters train (base and other adapters frozen)."""
    _check_name(model, name)
    freeze_all(model)
    for _, s in _switches(model):
        s.active = name
        if trainable and name in s.adapters:
            s.adapters[name].requires_grad_(True)


def active_adapter(model: nn.Module) -> str | None:
    return next((s.active for _, s in _switches(model)), None)


class _RestoreRouting:
    """Returned by `disable_adapters`: used as a context manager, it re-activates the previous adapter on exit."""

    def __init__(self, model: nn.Module, previous: str | None):
        self.model, self.previous = model, previous

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        for _, s in _switches(self.model):
            s.active = self.previous


def disable_adapters(model: nn.Module) -> _RestoreRouting:
    """Run the bare base model (exact base outputs): until `set_adapter` is called again, or, as
    `with disable_adapters(model): ...` (the LoRA API), until the block ends."""
    previous = active_adapter(model)
    for _, s in _switches(model):
        s.active = None
    return _RestoreRouting(model, previous)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter; once none is left, the original modules are put back in place."""
    _check_name(model, name)
    del _registry(model)[name]
    for path, s in list(_switches(model)):
        if name in s.adapters:
            del s.adapters[name]
        if s.active == name:
            s.active = None
        if not len(s.adapters):
            parent, child = get_submodule_parent(model, path)
            setattr(parent, child, s.base_layer)


@contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Each batch row i goes through adapter names[i] (None or "__base__": the bare base) at every switch."""
    names = [None if n == BASE_ROW else n for n in names]
    for n in set(names) - {None}:
        _check_name(model, n)
    switches = [s for _, s in _switches(model)]
    for s in switches:
        s.row_names = list(names)
    try:
        yield
    finally:
        for s in switches:
            s.row_names = None


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The adapter's parameters under their saved keys (see the module docstring)."""
    _check_name(model, name)
    out: dict[str, nn.Parameter] = {}
    for path, s in _switches(model):
        if name not in s.adapters:
            continue
        prefix = f"{path}.adapter." if s.mode == "residual" else f"modules_to_save.{path}."
        for k, p in s.adapters[name].named_parameters():
            out[prefix + k] = p
    return out


# ---- save / load ----------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, out_dir: str | Path, name: str | None = None, base_model_name: str = ""
) -> None:
    """Write adapter_config.json + adapter_model.safetensors for one named adapter."""
    name = name or active_adapter(model) or "default"
    _check_name(model, name)
    info = _registry(model)[name]
    cfg: AdapterConfig = info["cfg"]
    config = {
        "format": FORMAT,
        "format_version": 1,
        "method": "adapter",
        "placement": cfg.placement,
        "reduction_factor": None if cfg.bottleneck_size else (cfg.reduction_factor or DEFAULT_REDUCTION),
        "bottleneck_size": info["bottleneck"],
        "activation": cfg.activation,
        "dropout": cfg.dropout,
        "init": cfg.init,
        "layer_norm": cfg.layer_norm,
        "hidden_size": _hidden_size(model, info["points"]),
        "model_type": _model_type(model),
        "base_model_name_or_path": base_model_name
        or getattr(getattr(model, "config", None), "name_or_path", ""),
        "task": info["task"],
        "insertion_points": [p.name for p in info["points"]],
        "insertion_kinds": [p.kind for p in info["points"]],
        "modules_to_save": info["modules_to_save"],
    }
    write_adapter(out_dir, config, {k: p.detach() for k, p in adapter_state_dict(model, name).items()})


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__.lower()


def _check_base(model: nn.Module, saved: dict, in_dir: Path) -> None:
    """A mismatched base is an error naming both sides, never a shape crash."""
    if saved.get("format") != FORMAT:
        raise ValueError(f"{in_dir}: not a sftlab bottleneck adapter (format={saved.get('format')!r})")
    here = (_model_type(model), getattr(getattr(model, "config", None), "hidden_size", None))
    there = (saved["model_type"], saved["hidden_size"])
    if here[0] != there[0] or (here[1] is not None and int(here[1]) != int(there[1])):
        raise ValueError(
            f"{in_dir}: adapter was trained on model_type {there[0]!r} with hidden_size {there[1]} "
            f"({saved.get('base_model_name_or_path') or 'unknown base'}), but this base is model_type "
            f"{here[0]!r} with hidden_size {here[1]} ({type(model).__name__})"
        )
    missing = [p for p in saved["insertion_points"] if p not in dict(model.named_modules())]
    if missing:
        raise ValueError(
            f"{in_dir}: this {here[0]} base lacks {len(missing)} insertion points of the adapter "
            f"(first: {missing[0]}); it was saved from a base with a different layer layout"
        )


def config_from_saved(saved: dict) -> AdapterConfig:
    return AdapterConfig(
        placement=saved["placement"],
        bottleneck_size=saved["bottleneck_size"],
        activation=saved["activation"],
        dropout=saved.get("dropout", 0.0),
        layer_norm=saved["layer_norm"],
        modules_to_save=saved.get("modules_to_save", []),
    )


def load_adapter(model: nn.Module, in_dir: str | Path, name: str = "default", activate: bool = True) -> str:
    """Load a saved adapter as `name` (adding it if absent) and, by default, make it the active one."""
    in_dir = Path(in_dir)
    saved, tensors = read_adapter(in_dir)
    _check_base(model, saved, in_dir)
    if name not in _registry(model):
        add_adapter(model, name, config_from_saved(saved), saved.get("task", "causal-lm"))
    params = adapter_state_dict(model, name)
    if set(params) != set(tensors):
        extra, lacking = sorted(set(tensors) - set(params)), sorted(set(params) - set(tensors))
        raise ValueError(
            f"{in_dir}: adapter tensors do not match adapter {name!r} on this model "
            f"(unexpected: {extra[:3]}, missing: {lacking[:3]}); check placement/layer_norm/modules_to_save"
        )
    for k, p in params.items():
        if p.shape != tensors[k].shape:
            raise ValueError(
                f"{in_dir}: {k} has shape {tuple(tensors[k].shape)} in the file but {tuple(p.shape)} here "
                f"(saved bottleneck_size {saved['bottleneck_size']}, this adapter's {_registry(model)[name]['bottleneck']})"
            )
        with torch.no_grad():
            p.copy_(tensors[k].to(p.dtype))
    if activate:
        set_adapter(model, name)
    return name


# ---- the method contract --------------------------------------------------------------------------


def _apply(model: nn.Module, cfg: AdapterConfig, ctx: MethodContext) -> None:
    freeze_all(model)
    add_adapter(model, "default", cfg, ctx.task)
    set_adapter(model, "default")


def _save(model: nn.Module, cfg: AdapterConfig, out_dir: Path, ctx: MethodContext) -> None:
    save_adapter(model, out_dir, active_adapter(model) or "default", ctx.base_model_name)


def _load(model: nn.Module, cfg: AdapterConfig, in_dir: Path, ctx: MethodContext) -> None:
    load_adapter(model, in_dir, active_adapter(model) or "default")


METHOD = MethodSpec(
    "adapter",
    AdapterConfig,
    _apply,
    _save,
    _load,
    help="Bottleneck adapters (Houlsby / Pfeiffer) on a frozen base.",
)
