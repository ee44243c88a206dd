"""The bitsandbytes backend (`model.quant_backend: bitsandbytes`): its Linear4bit (NF4 / FP4 with double
quantisation) and Linear8bitLt, the layers PEFT and TRL users train QLoRA on. CUDA only, and only when bitsandbytes
is installed; sftlab's own codec (`codecs.py`, `QuantLinear`) runs everywhere else.

The layers are built on the CPU from the full-precision weights and quantise when the trainer moves the model to
the GPU (bitsandbytes' Params4bit does that in `.cuda()`). LoRA wraps them as it wraps any nn.Linear subclass
(the unfused path: base_layer(x) + s·B·A·x); merging decodes them with bitsandbytes' own dequantiser.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..errors import ModelError


def unavailable() -> str | None:
    """Why the bitsandbytes backend cannot run here (None: it can)."""
    if not torch.cuda.is_available():
        return "it runs on CUDA only and this machine has no CUDA device"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def require() -> None:
    why = unavailable()
    if why:
        raise ModelError(f"model.quant_backend: bitsandbytes: {why}; use quant_backend: torch (any device)")


def is_bnb_layer(m: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def bnb_layer(
    layer: nn.Linear, kind: str, double_quant: bool, compute_dtype: torch.dtype | None
) -> nn.Module:
    """The bitsandbytes layer standing for `layer` (still full precision on the CPU: it quantises on .cuda())."""
    import bitsandbytes as bnb

    w, b = layer.weight.detach(), layer.bias
    if kind == "nf4":
        out = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias=b is not None,
            compute_dtype=compute_dtype or w.dtype, compress_statistics=double_quant, quant_type="nf4",
        )  # fmt: skip
        out.weight = bnb.nn.Params4bit(
            w, requires_grad=False, compress_statistics=double_quant, quant_type="nf4"
        )
    else:
        out = bnb.nn.Linear8bitLt(
            layer.in_features, layer.out_features, bias=b is not None, has_fp16_weights=False
        )
        out.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if b is not None:
        out.bias = nn.Parameter(b.detach(), requires_grad=False)
    return out


def bnb_weight(m: nn.Module) -> torch.Tensor:
    """The (d_out, d_in) weight a bitsandbytes layer holds, decoded by bitsandbytes."""
    import bitsandbytes as bnb

    if isinstance(m, bnb.nn.Linear4bit):
        w = m.weight
        if getattr(w, "quant_state", None) is None:  # not yet moved to CUDA: still the original weight
            return w.data
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    state = getattr(m, "state", None)
    scb = getattr(m.weight, "SCB", None) or getattr(state, "SCB", None)
    if scb is None:
        return m.weight.data
    return m.weight.data.float() * (scb.float()[:, None] / 127)


def bnb_to_float(m: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    w = bnb_weight(m).to(dtype)
    out = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=dtype)
    out.weight = nn.Parameter(w, requires_grad=False)
    if m.bias is not None:
        out.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=False)
    return out
