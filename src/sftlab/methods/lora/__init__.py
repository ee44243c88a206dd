"""LoRA, rsLoRA, DoRA and PiSSA init on Linear and GPT-2 Conv1D layers, with named adapters and merging.

W' = W + s·B·A with A (r x d_in), B (d_out x r), s = alpha/r (rsLoRA: alpha/sqrt(r)); B starts at zero so
step 0 is the base model. Adapters are saved in PEFT's file layout.

Public API (all free functions on the HF model):
  add_adapter(model, name, cfg, task)   set_adapter(model, name)   delete_adapter(model, name)
  with disable_adapters(model): ...      with adapter_per_row(model, ["a", "b", "__base__"]): ...
  merge_adapter(model) / unmerge_adapter(model)
  merge_and_unload(model) -> plain HF model with merged weights (for `sftlab merge RUN_DIR OUT_DIR`:
      load the base, apply + load the run's adapter, merge_and_unload, save_pretrained)
  save_adapter(model, dir) / load_peft_adapter(model, dir, name) / lora_config_from_peft(dict)

Caveats (as in PEFT): PiSSA rewrites W to its residual, so with a PiSSA adapter `disable_adapters` gives the
residual model, and a second PiSSA adapter decomposes the residual; `delete_adapter` restores W. A module in
modules_to_save gets its own copy per adapter, which unties it from any weight it was tied to.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .._adapters import BASE_ROW as BASE
from .._adapters import SavedModule
from .._base import MethodContext, MethodSpec
from .._targets import freeze_all
from .config import LoraConfig, default_targets, lora_config_from_peft
from .io import adapter_config_dict, adapter_state_dict, load_peft_adapter, save_adapter
from .layer import LoraLayer
from .model import (
    adapter_names,
    adapter_per_row,
    add_adapter,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge_adapter,
    merge_and_unload,
    set_adapter,
    targetable_names,
    unmerge_adapter,
)

DEFAULT_ADAPTER = "default"


def _apply(model: nn.Module, cfg: LoraConfig, ctx: MethodContext) -> None:
    freeze_all(model)
    add_adapter(model, ctx.adapter, cfg, task=ctx.task)
    set_adapter(model, ctx.adapter)


def _save(model: nn.Module, cfg: LoraConfig, out_dir: Path, ctx: MethodContext) -> None:
    save_adapter(model, out_dir, ctx.adapter, base_model_name=ctx.base_model_name)


def _load(model: nn.Module, cfg: LoraConfig, in_dir: Path, ctx: MethodContext) -> None:
    # The file's own config wins (it may be a converted PiSSA adapter of rank 2r, or come from PEFT).
    load_peft_adapter(model, in_dir, ctx.adapter, task=ctx.task)


METHOD = MethodSpec(
    "lora",
    LoraConfig,
    _apply,
    _save,
    _load,
    help="Low-rank updates W + s·B·A on chosen Linear layers (rsLoRA, DoRA, PiSSA init); PEFT-compatible files.",
    merge=merge_and_unload,
    route=adapter_per_row,
    saved_prefix="base_model.model.",
)

__all__ = [
    "BASE",
    "DEFAULT_ADAPTER",
    "METHOD",
    "LoraConfig",
    "LoraLayer",
    "SavedModule",
    "adapter_config_dict",
    "adapter_names",
    "adapter_per_row",
    "adapter_state_dict",
    "add_adapter",
    "default_targets",
    "delete_adapter",
    "disable_adapters",
    "load_peft_adapter",
    "lora_config_from_peft",
    "lora_layers",
    "merge_adapter",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "targetable_names",
    "unmerge_adapter",
]
