"""PEFT-compatible files shared by prefix, P-tuning and prompt tuning: config fields and the seq-cls head.

PEFT saves every prompt-learning method as one tensor `prompt_embeddings` (the encoder already folded away) plus,
for sequence classification, the task head under `base_model.<module path>.<param>` (listed in modules_to_save).
The head trains as a modules_to_save copy (`_adapters.saved_copy`, adapter name "default"), as in PEFT and LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ._adapters import saved_copy
from ._base import MethodContext
from ._targets import task_head_modules
from .peft_format import TASK_TYPES, read_adapter, write_adapter

EMBEDDINGS_KEY = "prompt_embeddings"
# Prompt learning saves heads under the first prefix; LoRA-style adapters under the second.
HEAD_PREFIX = "base_model."
_HEAD_PREFIXES = (HEAD_PREFIX, "base_model.model.")


def peft_config(peft_type: str, model: nn.Module, ctx: MethodContext, **fields) -> dict:
    """The common adapter_config.json fields; `fields` add the method's own."""
    return {
        "peft_type": peft_type,
        "task_type": TASK_TYPES.get(ctx.task, ctx.task),
        "base_model_name_or_path": ctx.base_model_name or getattr(model.config, "name_or_path", ""),
        "inference_mode": True,
        "num_transformer_submodules": 1,
        "modules_to_save": task_head_modules(model, ctx.task) or None,
        "revision": None,
        "auto_mapping": None,
        **fields,
    }


def train_heads(model: nn.Module, ctx: MethodContext) -> None:
    """Each fresh task head trains as its own copy; the base head stays frozen."""
    for name in task_head_modules(model, ctx.task):
        saved_copy(model, name).requires_grad_(True)


def _head_parameters(model: nn.Module, ctx: MethodContext) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(head path, parameter name, trained parameter) of every task head."""
    for name in task_head_modules(model, ctx.task):
        for pname, p in saved_copy(model, name).named_parameters():
            yield name, pname, p


def head_tensors(model: nn.Module, ctx: MethodContext) -> dict[str, torch.Tensor]:
    return {f"base_model.{name}.{pname}": p.detach() for name, pname, p in _head_parameters(model, ctx)}


def save_adapter(
    model: nn.Module, ctx: MethodContext, out_dir: Path, config: dict, embeddings: torch.Tensor
) -> None:
    write_adapter(out_dir, config, {EMBEDDINGS_KEY: embeddings.detach(), **head_tensors(model, ctx)})


def read_checked(in_dir: Path, peft_type: str) -> tuple[dict, torch.Tensor, dict[str, torch.Tensor]]:
    """(config, prompt_embeddings, other tensors) of an adapter dir, checking its peft_type."""
    config, tensors = read_adapter(in_dir)
    if config.get("peft_type") != peft_type:
        raise ValueError(
            f"{in_dir}: adapter peft_type is {config.get('peft_type')!r}, expected {peft_type!r}"
        )
    if EMBEDDINGS_KEY not in tensors:
        raise ValueError(f"{in_dir}: no {EMBEDDINGS_KEY!r} tensor in the adapter weights")
    return config, tensors.pop(EMBEDDINGS_KEY), tensors


def load_heads(model: nn.Module, ctx: MethodContext, tensors: dict[str, torch.Tensor], in_dir: Path) -> None:
    """Copy saved seq-cls head weights into the model (every head parameter must be present)."""
    for name, pname, p in _head_parameters(model, ctx):
        keys = [f"{pre}{name}.{pname}" for pre in _HEAD_PREFIXES]
        key = next((k for k in keys if k in tensors), None)
        if key is None:
            raise ValueError(f"{in_dir}: the adapter has no weights for the task head {name}.{pname}")
        with torch.no_grad():
            p.copy_(tensors[key])
