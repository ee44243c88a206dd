"""The LoRA layer (Linear or GPT-2 Conv1D): a `Switch` (see `.._adapters`) holding one low-rank update per name.

`LoraLayer` keeps the frozen base layer and, per adapter name, A (r x d_in), B (d_out x r) and, for DoRA,
a magnitude vector m (d_out). Its forward adds s·(x A^T) B^T: two thin matmuls, never B·A, and no copy of
x when dropout is 0. Parameter names mirror PEFT's in-model layout (`base_layer`, `lora_A.<adapter>`,
`lora_magnitude_vector.<adapter>`) so state dicts read familiarly; io.py maps them to PEFT's file keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ... import gemm
from ...errors import ConfigError
from ...quant import QuantLinear, decoded_layer, is_quantized_layer
from .._adapters import Switch, mix_rows
from .config import LoraConfig

TARGET_TYPES = (nn.Linear, Conv1D, QuantLinear)
_CHUNK = 1 << 20  # elements of a base weight cast at a time for DoRA's row norms (4 MB in fp32)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s·(x A^T) B^T for 2-D x, with a hand-written backward.

    Forward: the update is accumulated into the base GEMM's output (addmm_, beta=1), so no (N, d_out) temporary
    for s·lora or the sum. Backward: dX = dY W + (s·dY B) A is one GEMM plus a thin addmm_ into its result,
    where autograd would run the two products separately and add them (an extra pass over an (N, d_in)
    tensor per layer); the scaling touches only the thin (N, r) and (d_out, r) gradients. Frozen W and b get
    no gradient work at all. The two big GEMMs (x W^T, dY W) go through `sftlab.gemm` (oneDNN while the trainer
    switches it on). The numbers equal the plain composition's (tested).

    A quantised base (`quant`, a QuantLinear; `weight` None) is decoded for the forward GEMM and again for dX, and
    never saved: no full-precision W outlives the layer's GEMM.
    """

    @staticmethod
    def forward(
        ctx, x2, weight, bias, A, B, scaling, quant=None
    ):  # (N, d_in), (d_out, d_in), (d_out,), (r, d_in), (d_out, r)
        xa = torch.mm(x2, A.t())  # (N, r)
        ctx.dnn = gemm.active()  # base GEMMs through oneDNN (gemm.py); backward keeps this choice
        ctx.quant = quant
        w = weight if quant is None else quant.dequantized(x2.dtype)
        out = gemm.linear(x2, w, bias, dnn=ctx.dnn)
        out.addmm_(xa, B.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, A, B, xa)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, dy):  # dy (N, d_out)
        x2, weight, A, B, xa = ctx.saved_tensors
        if ctx.quant is not None:
            weight = ctx.quant.dequantized(dy.dtype)
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        s = ctx.scaling
        dxa = torch.mm(dy, B).mul_(s)  # (N, r): the gradient reaching x A^T
        dx = dw = db = da = dB = None
        if need_x:
            dx = gemm.mm(dy, weight, dnn=ctx.dnn).addmm_(dxa, A)
        if need_w:
            dw = torch.mm(dy.t(), x2)
        if need_b:
            db = dy.sum(0)
        if need_a:
            da = torch.mm(dxa.t(), x2)
        if need_bb:
            dB = torch.mm(dy.t(), xa).mul_(s)
        return (dx, dw, db, da, dB, None, None)[: len(ctx.needs_input_grad)]


class LoraLayer(Switch):
    """A frozen Linear/Conv1D plus named low-rank updates; one adapter is active at a time."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, TARGET_TYPES):
            raise TypeError(f"LoRA wraps nn.Linear or Conv1D, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        # Conv1D stores its weight as (d_in, d_out): PEFT calls this fan_in_fan_out.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D) or getattr(base_layer, "transposed", False)
        # bitsandbytes' Linear4bit is an nn.Linear whose weight is packed, not (out, in): read the attributes
        if isinstance(base_layer, (QuantLinear, nn.Linear)):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        else:
            w = base_layer.weight
            self.in_features, self.out_features = (
                (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
            )
        self.lora_A = nn.ParameterDict()  # name -> (r, d_in)
        self.lora_B = nn.ParameterDict()  # name -> (d_out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # name -> (d_out,), DoRA only
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.fused: dict[str, bool] = {}  # adapter -> may take the fused forward (LoraConfig.fused_forward)
        self.merged: str | None = None
        self._merge_norm: torch.Tensor | None = None  # DoRA row norms at merge time, to unmerge exactly
        self._parked: list[nn.Module] = []  # a quantised base set aside while merged into its decoded copy
        self._row_sq: tuple | None = None  # DoRA: (base tensor, its key, ||W_i||^2), see _row_squares

    # Code elsewhere in transformers reads `.weight`/`.bias` of projections (e.g. for dtype checks).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def quantized(self) -> bool:
        return is_quantized_layer(self.base_layer)

    def _base_dtype_device(self) -> tuple[torch.dtype, torch.device]:
        base = self.base_layer
        if isinstance(base, QuantLinear):
            return base.compute_dtype, base.q_codes.device
        w = base.weight
        if not w.dtype.is_floating_point:  # bitsandbytes' packed codes
            return getattr(base, "compute_dtype", None) or torch.float32, w.device
        return w.dtype, w.device

    def base_weight(self) -> torch.Tensor:
        """W as (d_out, d_in), a view of the base parameter (in-place edits reach it); a quantised base: a
        decoded copy."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in d:
                yield d[name]

    def unwrapped(self) -> nn.Module:
        return self.base_layer

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_adapter(self, name: str, cfg: LoraConfig) -> None:
        if cfg.init == "pissa" and self.quantized():
            raise ConfigError(
                "method.init: pissa rewrites the base weights to their residual, and this base is quantised "
                "(model.quantize); use init default or gaussian, or drop model.quantize"
            )
        if cfg.use_dora and self.quantized() and not isinstance(self.base_layer, QuantLinear):
            raise ConfigError(
                "method.use_dora: DoRA reads the base weights' row norms every step, which sftlab does not decode "
                "from bitsandbytes layers; use model.quant_backend: torch (DoRA works there), or plain LoRA"
            )
        w_dtype, device = self._base_dtype_device()
        # Half-precision bases get fp32 adapters (as PEFT's autocast_adapter_dtype): tiny, and stable to train.
        dtype = torch.float32 if w_dtype in (torch.float16, torch.bfloat16) else w_dtype
        a = torch.empty(cfg.r, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(self.out_features, cfg.r, dtype=dtype, device=device)
        if cfg.init == "gaussian":
            nn.init.normal_(a, std=1 / cfg.r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.scaling[name] = cfg.scaling
        self.dropout[name] = cfg.dropout
        self.fused[name] = cfg.fused_forward
        if cfg.init == "pissa":
            self._pissa_init(name)
        if cfg.use_dora:
            with torch.no_grad():
                m = self._weight_norm(name)
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(dtype))
        if self.active is None:
            self.active = name

    @torch.no_grad()
    def _pissa_init(self, name: str) -> None:
        """A, B from the top-r SVD of W (PEFT's PiSSA); W becomes the residual so W_res + s·B·A == W."""
        W = self.base_weight()
        s, r = self.scaling[name], self.lora_A[name].shape[0]
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)  # W = U diag(S) Vh
        sr = torch.sqrt(S[:r] / s)
        a = sr[:, None] * Vh[:r]  # (r, d_in)
        b = U[:, :r] * sr[None, :]  # (d_out, r)
        self.lora_A[name].data = a.to(self.lora_A[name].dtype)
        self.lora_B[name].data = b.to(self.lora_B[name].dtype)
        W.copy_((W.float() - s * (b @ a)).to(W.dtype))
        # The initial A0, B0: saving converts to a plain LoRA (see io.py), deleting restores W.
        self.register_buffer(f"pissa_A0_{name}", self.lora_A[name].detach().clone(), persistent=False)
        self.register_buffer(f"pissa_B0_{name}", self.lora_B[name].detach().clone(), persistent=False)

    def pissa_init_tensors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a0 = getattr(self, f"pissa_A0_{name}", None)
        return None if a0 is None else (a0, getattr(self, f"pissa_B0_{name}"))

    @torch.no_grad()
    def delete_adapter(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        init = self.pissa_init_tensors(name)
        if init is not None:  # put back the part of W that PiSSA moved into A0, B0
            a0, b0 = init
            W = self.base_weight()
            W.copy_((W.float() + self.scaling[name] * (b0.float() @ a0.float())).to(W.dtype))
            delattr(self, f"pissa_A0_{name}")
            delattr(self, f"pissa_B0_{name}")
        for d in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)
        self.fused.pop(name, None)
        if self.active == name:
            self.active = None

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs and self._fused_ok(x):
            return self._fused_forward(x)
        result = self.base_layer(x, *args, **kwargs)  # (..., d_out)
        if self.row_names is not None:
            if self.merged is not None:
                raise RuntimeError(
                    "adapter_per_row needs unmerged adapters; call unmerge_adapter(model) first"
                )
            lora_a = self.lora_A
            return mix_rows(
                result,
                self.row_names,
                lambda n, idx: result[idx] + self._delta(x[idx], result[idx], n) if n in lora_a else None,
            )
        name = self.current()
        if name is None or self.merged is not None:
            return result
        if name in self.lora_magnitude_vector and not (self.dropout[name] > 0 and self.training):
            return self._dora_output(x, result, name)
        return result + self._delta(x, result, name)

    def _dora_output(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """DoRA's output without dropout, m/||W + s·BA|| * (W x + s·B A x) + b, written so that backward keeps one
        (tokens x d_out) tensor: `result + _delta(...)` keeps two and makes four such temporaries per layer, which
        fragmented the retained heap (B1 DoRA peak RSS ~1,950 -> ~1,400 MB, same values: PEFT parity tests)."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        lora = F.linear(F.linear(x.to(A.dtype), A), B)
        with torch.no_grad():
            norm = self._weight_norm(name)
        scale = self.lora_magnitude_vector[name] / norm
        bias = self.base_layer.bias
        base = result if bias is None else result - bias
        out = scale * torch.add(base.to(lora.dtype), lora, alpha=s)
        if bias is not None:
            out = out + bias
        return out.to(result.dtype)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """The plain-LoRA fast path: a hook-free nn.Linear (or QuantLinear) base, one active adapter, no dropout
        in training, no DoRA, one dtype."""
        name, base = self.current(), self.base_layer
        if (
            self.row_names is not None
            or name is None
            or self.merged is not None
            or not self.fused.get(name, True)
        ):
            return False
        return (
            type(base) in (nn.Linear, QuantLinear)
            and not (base._forward_hooks or base._forward_pre_hooks)
            and name not in self.lora_magnitude_vector
            and not (self.training and self.dropout[name] > 0)
            and x.dtype == self.lora_A[name].dtype == self._base_dtype_device()[0]
            and not torch.is_autocast_enabled(
                x.device.type
            )  # train.precision *-mixed: autocast's own kernels
        )

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b + s·(x A^T) B^T as one autograd node (`_LoraLinear`); see there for what it saves."""
        name, base = self.active, self.base_layer
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        quant = base if isinstance(base, QuantLinear) else None
        out = _LoraLinear.apply(
            x2, None if quant else base.weight, base.bias, self.lora_A[name], self.lora_B[name],
            self.scaling[name], quant,
        )  # fmt: skip
        return out.view(*x.shape[:-1], out.shape[-1])

    def _delta(self, x: torch.Tensor, result: torch.Tensor, name: str) -> torch.Tensor:
        """What adapter `name` adds to the base output `result` for input x (..., d_in)."""
        A, B, s, p = self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        xd = F.dropout(x, p, training=True) if (p > 0 and self.training) else x  # p == 0: no copy of x
        lora = F.linear(F.linear(xd.to(A.dtype), A), B)  # (..., r) -> (..., d_out)
        if name not in self.lora_magnitude_vector:
            return (lora * s).to(result.dtype)
        # DoRA (PEFT semantics): out = m/||W + s·BA|| * (W x + s·B A x), with the norm detached (DoRA §4.3).
        with torch.no_grad():
            norm = self._weight_norm(name)  # (d_out,)
        scale = self.lora_magnitude_vector[name] / norm  # (d_out,)
        if xd is x:
            bias = self.base_layer.bias
            base = result if bias is None else result - bias
        else:
            base = F.linear(xd, self.base_weight().to(xd.dtype))
        return ((scale - 1) * base + scale * lora * s).to(result.dtype)

    @torch.no_grad()
    def _weight_norm(self, name: str) -> torch.Tensor:
        """Row norms of W + s·B·A (d_out,), never part of the autograd graph (DoRA §4.3), and never through a
        (d_out, d_in) temporary: sftlab keeps glibc's heap (train/memory.py), where weight-sized holes between
        activations fragment it (DoRA's peak RSS was 12-37% over LoRA's). Row i expands to

            ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i·(A W_i^T) + s^2 B_i (A A^T) B_i^T,

        so it takes P = W A^T (d_out, r), Q = A A^T (r, r) and the cached ||W_i||^2, all in at least fp32 as
        `_work`. Clamped at 0: the sum can cancel slightly below it where W_i + s B_i A ~ 0."""
        W = self.base_weight()  # (d_out, d_in); a quantised base: decoded once, as its forward does
        dt = torch.promote_types(W.dtype, torch.float32)
        A = self.lora_A[name].to(dt)  # (r, d_in)
        B = self.lora_B[name].to(dt)  # (d_out, r)
        s = self.scaling[name]
        dev = (
            W.device.type
        )  # train.precision *-mixed: these stay in dt (the planner's meta tensors have no autocast)
        with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else nullcontext():
            P = self._row_products(W, A, dt)  # (d_out, r)
            sq = self._row_squares(W, dt)  # (d_out,)
            BQ = B @ (A @ A.T)  # (d_out, r)
            norm2 = sq + (2 * s) * (B * P).sum(1) + (s * s) * (BQ * B).sum(1)
        return norm2.clamp_(min=0).sqrt_().to(self.lora_A[name].dtype)

    @staticmethod
    def _row_chunks(W: torch.Tensor, dt: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, W[rows] in dt) over W: the whole W when it is already dt (no copy), else rows in chunks of
        at most `_CHUNK` elements, so the cast never makes a weight-sized copy."""
        if W.dtype == dt:
            yield 0, W
            return
        rows = max(1, _CHUNK // max(1, W.shape[1]))
        for i in range(0, W.shape[0], rows):
            yield i, W[i : i + rows].to(dt)

    def _row_products(self, W: torch.Tensor, A: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """P = W A^T (d_out, r) in dt."""
        P = torch.empty(W.shape[0], A.shape[0], dtype=dt, device=A.device)
        for i, w in self._row_chunks(W, dt):
            torch.mm(w, A.T, out=P[i : i + w.shape[0]])
        return P

    def _row_squares(self, W: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """||W_i||^2 (d_out,) in dt, cached while the base weight is the same tensor at the same version: W is
        frozen, and merge/unmerge/PiSSA write it in place (which bumps `_version`); a quantised base never changes."""
        t, key = self._base_key(dt)
        cached = self._row_sq
        if key is not None and cached is not None and cached[0] is t and cached[1] == key:
            return cached[2]
        sq = torch.empty(W.shape[0], dtype=dt, device=W.device)
        for i, w in self._row_chunks(W, dt):
            torch.linalg.vector_norm(w, dim=1, out=sq[i : i + w.shape[0]])
        sq.square_()
        self._row_sq = None if key is None else (t, key, sq)
        return sq

    def _base_key(self, dt: torch.dtype) -> tuple[torch.Tensor, tuple | None]:
        """The tensor holding the base weight's values (the codes, for a quantised base) and what says they are
        unchanged: its storage and version counter. No key where it has no version counter (an inference-mode
        tensor): then nothing is cached."""
        base = self.base_layer
        t = base.q_codes if isinstance(base, QuantLinear) else base.weight
        try:
            version = t._version
        except RuntimeError:
            return t, None
        return t, (t.data_ptr(), version, t.dtype, t.device, tuple(t.shape), dt)

    # ---- merge ----------------------------------------------------------------------------------------------
    def _work(self, W: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, s·B·A) in at least fp32, so merging a half-precision base loses as little as possible."""
        dt = torch.promote_types(W.dtype, torch.float32)
        delta = self.scaling[name] * (self.lora_B[name].to(dt) @ self.lora_A[name].to(dt))
        return W.to(dt), delta

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into W: W += s·B·A, or for DoRA W = m/||W + s·BA|| * (W + s·BA)."""
        if self.merged == name or name not in self.lora_A:
            return
        if self.merged is not None:
            self.unmerge()
        if self.quantized():  # merge into its decoded copy; unmerge puts the quantised layer back
            self._parked = [self.base_layer]
            self.base_layer = decoded_layer(self.base_layer)
        W = self.base_weight()
        w, delta = self._work(W, name)  # (d_out, d_in), in fp32 or wider
        if name in self.lora_magnitude_vector:
            norm = torch.linalg.norm(w + delta, dim=1)
            self._merge_norm = norm
            factor = (self.lora_magnitude_vector[name].to(norm.dtype) / norm)[:, None]
            W.copy_((factor * (w + delta)).to(W.dtype))
        else:
            W.copy_((w + delta).to(W.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        name = self.merged
        if name is None:
            return
        if self._parked:  # the quantised base, exactly as it was
            self.base_layer, self._parked = self._parked[0], []
            self._merge_norm, self.merged = None, None
            return
        W = self.base_weight()
        w, delta = self._work(W, name)
        if name in self.lora_magnitude_vector:
            factor = (self.lora_magnitude_vector[name].to(w.dtype) / self._merge_norm)[:, None]
            W.copy_((w / factor - delta).to(W.dtype))
            self._merge_norm = None
        else:
            W.copy_((w - delta).to(W.dtype))
        self.merged = None

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self.active}, merged={self.merged}"
