"""`QuantLinear`: a frozen Linear (or GPT-2 Conv1D) whose weight is held quantised and decoded per use.

The forward decodes W into the compute dtype, runs the GEMM and drops W again; backward decodes it once more for
dX = dY W. So no full-precision copy of a quantised weight outlives one layer's GEMM, and the layer keeps nothing
for backward but itself (its weight is frozen: no dW, so no saved input). Inference (generation: a forward per token)
decodes each weight once instead, inside `cache.decoded_once` (eval mode only). LoRA wraps it like an nn.Linear
(`methods/lora/layer.py`), with its update added into the same GEMM's output.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import gemm
from .codecs import (
    Int8Weight,
    NF4Weight,
    dequantize_int8,
    dequantize_nf4,
    quantize_int8,
    quantize_nf4,
)

KINDS = ("nf4", "int8")


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with W decoded from `layer` in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x2, layer, bias):  # (N, d_in), QuantLinear, (d_out,) | None
        ctx.layer, ctx.dnn = layer, gemm.active()
        return gemm.linear(x2, layer.dequantized(x2.dtype), bias, dnn=ctx.dnn)

    @staticmethod
    def backward(ctx, dy):  # (N, d_out)
        dx = gemm.mm(dy, ctx.layer.dequantized(dy.dtype), dnn=ctx.dnn) if ctx.needs_input_grad[0] else None
        return dx, None, None


class QuantLinear(nn.Module):
    """A frozen linear layer stored as NF4 or int8 (buffers `q_codes`, `q_scales`, ...); the bias stays as it was.

    `weight` (a property) decodes to the original layout and dtype, for code that reads a projection's weight;
    the forward never goes through it.
    """

    def __init__(
        self,
        layer: nn.Linear | Conv1D,
        kind: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"quantize: {kind!r} is not one of {', '.join(KINDS)}")
        self.transposed = isinstance(layer, Conv1D)  # Conv1D holds W as (d_in, d_out)
        self._setup(layer.weight.detach(), layer.bias, kind, double_quant, compute_dtype)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        transposed: bool,
        kind: str = "nf4",
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """A QuantLinear straight from a weight tensor (as a checkpoint holds it: (d_in, d_out) when
        `transposed`), for loaders that never build the full-precision layer (`quant/stream.py`)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        if kind not in KINDS:
            raise ValueError(f"quantize: {kind!r} is not one of {', '.join(KINDS)}")
        self.transposed = transposed
        self._setup(weight.detach(), bias, kind, double_quant, compute_dtype)
        return self

    def _setup(self, w, bias, kind, double_quant, compute_dtype) -> None:
        w = w.t() if self.transposed else w  # (d_out, d_in)
        self.out_features, self.in_features = w.shape
        self.kind, self.double_quant = kind, double_quant
        self.orig_dtype = w.dtype
        self.compute_dtype = compute_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
        q = quantize_nf4(w, double_quant) if kind == "nf4" else quantize_int8(w)
        for name, t in q.tensors().items():
            self.register_buffer(f"q_{name}", t)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.decode_cache = None  # a cache.DecodedWeights while a `decoded_once` block is open

    def _codec(self) -> NF4Weight | Int8Weight:
        if self.kind == "int8":
            return Int8Weight(self.q_codes, self.q_scales)
        dq = self.double_quant
        return NF4Weight(
            self.q_codes,
            self.q_scales,
            self.q_factors if dq else None,
            self.q_mean if dq else None,
            (self.out_features, self.in_features),
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W as (d_out, d_in) in `dtype` (default: the compute dtype), for a GEMM to read (never to write): decoded
        now, or in eval mode inside `cache.decoded_once`, decoded once and kept for the next forward."""
        dtype = dtype or self.compute_dtype
        if self.decode_cache is not None and not self.training:
            return self.decode_cache.get(self, dtype)
        return self.decoded(dtype)

    def decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """W as (d_out, d_in) in `dtype`, freshly decoded (a tensor of the caller's own)."""
        q = self._codec()
        return dequantize_nf4(q, dtype) if self.kind == "nf4" else dequantize_int8(q, dtype)

    def train(self, mode: bool = True) -> QuantLinear:
        """Training resumes: this layer's decoded weights leave the cache (a forward decodes per use again)."""
        if mode and self.decode_cache is not None:
            self.decode_cache.drop(self)
        return super().train(mode)

    @property
    def weight(self) -> torch.Tensor:
        w = self.decoded(self.orig_dtype)
        return w.t() if self.transposed else w

    def quantized_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(self.compute_dtype)  # (N, d_in)
        bias = None if self.bias is None else self.bias.to(x2.dtype)
        out = _QuantMatmul.apply(x2, self, bias)  # (N, d_out)
        return out.view(*x.shape[:-1], self.out_features).to(in_dtype)

    def to_float(self) -> nn.Linear | Conv1D:
        """The plain layer this stands for, its weight decoded (in the original dtype): for merging and export."""
        w = self.decoded(self.orig_dtype)  # its own copy: merging adds into it
        dev = w.device
        if self.transposed:
            out = Conv1D(self.out_features, self.in_features)
            out.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        else:
            out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev)
            out.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out.to(device=dev)

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.kind == "nf4" and self.double_quant else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}{dq}, "
            f"compute_dtype={self.compute_dtype}"
        )
