"""Quantise a loaded model's frozen linear layers in place, report what they take, and decode them back.

Which layers: every nn.Linear / GPT-2 Conv1D except the output head (lm_head, or a weight tied to the input
embeddings), task heads (classifier, score, qa_outputs: fresh and trained) — so embeddings, norms and heads keep
their precision, as in QLoRA. One layer at a time: its full-precision weight is freed as soon as its codes exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import bnb
from .linear import KINDS, QuantLinear

BACKENDS = ("torch", "bitsandbytes")
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantise a base: `kind` nf4 | int8, NF4 double quantisation, the GEMMs' dtype (None: the model's),
    and whose layers hold the codes: sftlab's QuantLinear (`torch`, any device) or bitsandbytes' (CUDA)."""

    kind: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    backend: str = "torch"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model.quantize: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model.quant_backend: {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.compute_dtype is not None and self.compute_dtype not in _DTYPES:
            raise ValueError(
                f"model.compute_dtype: {self.compute_dtype!r} is not one of {', '.join(_DTYPES)}"
            )

    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else _DTYPES[self.compute_dtype]


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, child = path.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def quantizable(model: nn.Module) -> list[str]:
    """Paths of the linear layers `quantize_model` replaces (heads and embedding-tied weights excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out = []
    for path, m in model.named_modules():
        if type(m) not in (nn.Linear, Conv1D) or m is head or path.rsplit(".", 1)[-1] in HEAD_NAMES:
            continue
        if id(m.weight) in tied:
            continue
        out.append(path)
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Replace the frozen linears (see `quantizable`) by QuantLinear, one at a time; returns their paths."""
    paths = quantizable(model)
    if spec.backend == "bitsandbytes":
        bnb.require()
    for path in paths:
        parent, child = _parent(model, path)
        layer = getattr(parent, child)
        cdt = spec.torch_compute_dtype()
        if spec.backend == "bitsandbytes" and type(layer) is nn.Linear:  # GPT-2's Conv1D: sftlab's layer
            new = bnb.bnb_layer(layer, spec.kind, spec.double_quant, cdt)
        else:
            new = QuantLinear(layer, spec.kind, spec.double_quant, cdt)
        setattr(parent, child, new)
        del layer  # the full-precision weight goes with the last reference
    model._sftlab_quant = spec
    return paths


def is_quantized_layer(m: nn.Module) -> bool:
    return isinstance(m, QuantLinear) or bnb.is_bnb_layer(m)


def decoded_layer(m: nn.Module) -> nn.Module:
    """The plain full-precision layer a quantised one (sftlab's or bitsandbytes') stands for."""
    return m.to_float() if isinstance(m, QuantLinear) else bnb.bnb_to_float(m)


def quant_spec(model: nn.Module) -> QuantSpec | None:
    """The spec a model was quantised with (None: not quantised)."""
    return getattr(model, "_sftlab_quant", None)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Replace every QuantLinear (also inside wrappers such as LoRA's base_layer) by the plain layer it decodes
    to; returns how many. The model is then an ordinary HF model again (for merging and `save_pretrained`)."""
    found = [(p, m) for p, m in model.named_modules() if is_quantized_layer(m)]
    for path, m in found:
        parent, child = _parent(model, path)
        setattr(parent, child, decoded_layer(m))
    if hasattr(model, "_sftlab_quant"):
        del model._sftlab_quant
    return len(found)


def weight_memory(model: nn.Module) -> dict:
    """Bytes of the quantised layers' weights as stored and as they were (original dtype), plus everything else
    in the model (embeddings, norms, heads, biases, adapters), for the train summary and the planner."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    stored = sum(m.quantized_bytes() for m in layers)
    original = sum(m.in_features * m.out_features * m.orig_dtype.itemsize for m in layers)
    quant_ids = {id(t) for m in layers for t in m.buffers()}
    seen: set[int] = set()
    other = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in quant_ids:
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
    spec = quant_spec(model)
    return {
        "quantize": spec.kind if spec else None,
        "quantized_layers": len(layers),
        "quantized_params": sum(
            m.in_features * m.out_features for m in layers
        ),  # held as buffers, not parameters
        "quantized_weight_bytes": stored,
        "original_weight_bytes": original,
        "ratio": stored / original if original else None,
        "other_bytes": other,
    }
