"""Bottleneck adapters on disk, in sftlab's own format (PEFT has no bottleneck adapters; see the package docstring)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..peft_format import read_adapter, write_adapter
from .config import DEFAULT_REDUCTION, AdapterConfig
from .model import (
    AdapterEntry,
    active_adapter,
    adapter_state_dict,
    adapters_of,
    add_adapter,
    hidden_size,
    set_adapter,
)

FORMAT = "sftlab-bottleneck-adapter"


def save_adapter(
    model: nn.Module, out_dir: str | Path, name: str | None = None, base_model_name: str = ""
) -> None:
    """Write adapter_config.json + adapter_model.safetensors for one named adapter."""
    name = name or active_adapter(model) or "default"
    info: AdapterEntry = adapters_of(model).require(name)
    cfg = info.cfg
    config = {
        "format": FORMAT,
        "format_version": 1,
        "method": "adapter",
        "placement": cfg.placement,
        "reduction_factor": None if cfg.bottleneck_size else (cfg.reduction_factor or DEFAULT_REDUCTION),
        "bottleneck_size": info.bottleneck,
        "activation": cfg.activation,
        "dropout": cfg.dropout,
        "init": cfg.init,
        "layer_norm": cfg.layer_norm,
        "hidden_size": hidden_size(model, info.points),
        "model_type": _model_type(model),
        "base_model_name_or_path": base_model_name
        or getattr(getattr(model, "config", None), "name_or_path", ""),
        "task": info.task,
        "insertion_points": [p.name for p in info.points],
        "insertion_kinds": [p.kind for p in info.points],
        "modules_to_save": info.modules_to_save,
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
    if name not in adapters_of(model).info:
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
                f"(saved bottleneck_size {saved['bottleneck_size']}, this adapter's "
                f"{adapters_of(model).info[name].bottleneck})"
            )
        with torch.no_grad():
            p.copy_(tensors[k].to(p.dtype))
    if activate:
        set_adapter(model, name)
    return name
