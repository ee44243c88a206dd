"""Bottleneck adapters (Houlsby / Pfeiffer): a small residual MLP on sub-layer outputs, base frozen.

Each insertion point is a block's attention-output or FFN-output projection (see `adapter_map`). The
projection is wrapped so that, with h its output (before the block's residual add),

    h_out = h + W_up · dropout(act(W_down · LN(h)))        LN only when layer_norm: true

Houlsby puts one after every attention output (self- and cross-attention) and one after every FFN output;
Pfeiffer only after the FFN output. W_up and its bias start at zero, so at step 0 the model is exactly the
base; W_down is small random (nn.Linear default init). Several named adapters can live on one base
(`add_adapter`, `set_adapter`, `disable_adapters`, `delete_adapter`), and `adapter_per_row` routes each row
of a batch through its own adapter, in inference and training alike (the shared rules of `.._adapters`).

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

from pathlib import Path

from torch import nn

from .._base import MethodContext, MethodSpec
from .._targets import freeze_all
from .adapter_map import InsertionPoint, find_insertion_points
from .config import DEFAULT_REDUCTION, AdapterConfig, adapter_param_count
from .io import FORMAT, config_from_saved, load_adapter, save_adapter
from .layer import AdapterSwitch, BottleneckAdapter
from .model import (
    active_adapter,
    adapter_per_row,
    adapter_state_dict,
    add_adapter,
    delete_adapter,
    disable_adapters,
    set_adapter,
)


def _apply(model: nn.Module, cfg: AdapterConfig, ctx: MethodContext) -> None:
    freeze_all(model)
    add_adapter(model, ctx.adapter, cfg, ctx.task)
    set_adapter(model, ctx.adapter)


def _save(model: nn.Module, cfg: AdapterConfig, out_dir: Path, ctx: MethodContext) -> None:
    save_adapter(model, out_dir, ctx.adapter, ctx.base_model_name)


def _load(model: nn.Module, cfg: AdapterConfig, in_dir: Path, ctx: MethodContext) -> None:
    load_adapter(model, in_dir, ctx.adapter)


METHOD = MethodSpec(
    "adapter",
    AdapterConfig,
    _apply,
    _save,
    _load,
    help="Bottleneck adapters (Houlsby / Pfeiffer) on a frozen base.",
    route=adapter_per_row,
    saved_prefix="modules_to_save.",
)

__all__ = [
    "DEFAULT_REDUCTION",
    "FORMAT",
    "METHOD",
    "AdapterConfig",
    "AdapterSwitch",
    "BottleneckAdapter",
    "InsertionPoint",
    "active_adapter",
    "adapter_param_count",
    "adapter_per_row",
    "adapter_state_dict",
    "add_adapter",
    "config_from_saved",
    "delete_adapter",
    "disable_adapters",
    "find_insertion_points",
    "load_adapter",
    "save_adapter",
    "set_adapter",
]
