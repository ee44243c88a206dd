"""LoRA adapters on disk in PEFT's layout, both ways.

Keys are PEFT 0.21's, with the adapter name stripped:
  base_model.model.<path>.lora_A.weight (r, d_in), .lora_B.weight (d_out, r), .lora_magnitude_vector (d_out,)
  base_model.model.<modules_to_save path>.<param>           (the adapter's trained copy)
Only the adapter's own tensors are written (kilobytes for tiny models). A PiSSA adapter is saved converted
to a plain LoRA of rank 2r (A' = [A; A0], B' = [B, -B0], same scale), like PEFT's
`path_initial_model_for_weight_conversion`, so it applies to the unmodified base model.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .._adapters import SavedModule
from ..peft_format import TASK_TYPES, read_adapter, write_adapter
from .config import LoraConfig, lora_config_from_peft, to_peft_dict
from .layer import LoraLayer
from .model import ATTR, add_adapter, delete_adapter, lora_entry, set_adapter

PREFIX = "base_model.model."
_TASK_FROM_PEFT = {v: k for k, v in TASK_TYPES.items()}


def _lora_keys(path: str) -> tuple[str, str, str]:
    p = PREFIX + path
    return p + ".lora_A.weight", p + ".lora_B.weight", p + ".lora_magnitude_vector"


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under PEFT's file keys (PiSSA converted to plain LoRA)."""
    name, entry = lora_entry(model, name)
    out: dict[str, torch.Tensor] = {}
    for path in entry.targets:
        layer: LoraLayer = model.get_submodule(path)
        ka, kb, km = _lora_keys(path)
        a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
        init = layer.pissa_init_tensors(name)
        if init is not None:  # s·(BA - B0A0) = s·[B, -B0]·[A; A0]
            a, b = torch.cat([a, init[0]], dim=0), torch.cat([b, -init[1]], dim=1)
        out[ka], out[kb] = a, b
        if name in layer.lora_magnitude_vector:
            out[km] = layer.lora_magnitude_vector[name].detach()
    for path in entry.saved:
        mod: SavedModule = model.get_submodule(path)
        for k, v in mod.modules_to_save[name].state_dict().items():
            out[f"{PREFIX}{path}.{k}"] = v.detach()
    return out


def adapter_config_dict(model: nn.Module, name: str | None = None, base_model_name: str = "") -> dict:
    """adapter_config.json for adapter `name`, readable by `peft.LoraConfig`."""
    name, entry = lora_entry(model, name)
    cfg = entry.config
    if cfg.init == "pissa":  # saved converted: rank 2r with the same scale, applied to the original W
        alpha = cfg.alpha * (math.sqrt(2) if cfg.use_rslora else 2)
        cfg = cfg.model_copy(update={"r": 2 * cfg.r, "alpha": alpha, "init": "default"})
    fan_in_fan_out = any(model.get_submodule(p).fan_in_fan_out for p in entry.targets)
    base = base_model_name or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return to_peft_dict(cfg, entry.target_spec, entry.saved, entry.task, base, fan_in_fan_out)


def save_adapter(
    model: nn.Module, out_dir: str | Path, name: str | None = None, base_model_name: str = ""
) -> None:
    """Write adapter_config.json + adapter_model.safetensors; `peft.PeftModel.from_pretrained` loads them."""
    write_adapter(out_dir, adapter_config_dict(model, name, base_model_name), adapter_state_dict(model, name))


@torch.no_grad()
def _load_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    _, entry = lora_entry(model, name)
    # Older PEFT wrote "...lora_magnitude_vector.weight" and "...<module>.modules_to_save.<param>".
    tensors = {
        k.removesuffix(".weight")
        if k.endswith("lora_magnitude_vector.weight")
        else k.replace(".modules_to_save.", "."): v
        for k, v in tensors.items()
    }
    dests: dict[str, torch.Tensor] = {}
    for path in entry.targets:
        layer: LoraLayer = model.get_submodule(path)
        ka, kb, km = _lora_keys(path)
        dests[ka], dests[kb] = layer.lora_A[name], layer.lora_B[name]
        if name in layer.lora_magnitude_vector:
            dests[km] = layer.lora_magnitude_vector[name]
    for path in entry.saved:
        mod: SavedModule = model.get_submodule(path)
        for k, v in mod.modules_to_save[name].state_dict(keep_vars=True).items():
            dests[f"{PREFIX}{path}.{k}"] = v
    # PEFT lists classifier+score for any seq-cls model, so a saved head may be missing from the model only
    # if it is also missing from the file; a tensor the model lacks, or one it needs but the file lacks, is an error.
    missing = sorted(k for k in dests if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in dests)
    if missing or unexpected:
        raise ValueError(
            f"adapter file does not fit this model: missing {missing[:4]} ({len(missing)}), "
            f"unexpected {unexpected[:4]} ({len(unexpected)})"
        )
    for k, dst in dests.items():
        src = tensors[k]
        if src.shape != dst.shape:
            raise ValueError(
                f"adapter tensor {k}: file has shape {tuple(src.shape)}, model needs {tuple(dst.shape)}"
            )
        dst.copy_(src.to(dst.dtype))


def load_peft_adapter(
    model: nn.Module, in_dir: str | Path, name: str = "default", task: str | None = None
) -> LoraConfig:
    """Load a LoRA adapter directory written by sftlab or PEFT as adapter `name` (replacing one of that name).

    The LoraConfig is built from adapter_config.json; an unconverted PiSSA adapter re-runs PiSSA on the base
    weights first, as PEFT does, so its A/B apply to the residual they were trained on.
    """
    raw, tensors = read_adapter(in_dir)
    cfg = lora_config_from_peft(raw)
    task = task or _TASK_FROM_PEFT.get(raw.get("task_type") or "", "causal-lm")
    reg = getattr(model, ATTR, None)
    was_active = reg.active if reg else None
    if reg is not None and name in reg.info:
        delete_adapter(model, name)
    add_adapter(model, name, cfg, task=task)
    _load_tensors(model, name, tensors)
    if was_active in (None, name):
        set_adapter(model, name)
    return cfg
