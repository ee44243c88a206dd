"""fp32 GEMMs of the training path through oneDNN instead of torch's default BLAS, where that is exact and faster.

Why: on CPU torch.mm / F.linear call MKL, whose fp32 kernels on AMD processors take its generic AVX2 path, while
oneDNN (shipped inside every x86 torch build, `torch.ops.mkldnn._linear_pointwise`) dispatches on the ISA and
runs AVX-512 there. Measured on the benchmark machine (AMD EPYC, 2 threads, interleaved calls): the B1 shapes
run 160-190 GFLOP/s through MKL and 190-210 through oneDNN, the LM head's 256 x 512 x 32000 logits 128 -> 194.
Both are IEEE fp32 (relative error to a float64 product ~1e-6 either way; the probe below refuses a oneDNN set
to bf16/tf32 math, whose error is ~1e-3).

Which GEMMs: the big ones with a frozen or trained weight: y = x W^T + b (forward) and dX = dY W (backward),
for LoRA's base layer (`methods/lora/layer._LoraLinear`), for plain nn.Linear layers while training (full and
freeze fine-tuning, `linears()`), and the fused LM head + cross-entropy (`loss.py`). Rank-r thin products and
weight gradients (dW = dY^T X) stay on torch.mm, where oneDNN measured no faster or slower.

Switch: `perf.onednn_gemm` (default on), taken where torch runs AVX-512 kernels (`pays`). `enabled(True)` is
a context `train/patches.applied` holds for a fit (with `linears()`); autograd nodes record the choice at
forward, so their backward agrees with it. Off, or
where oneDNN is missing, the CPU has no AVX-512, the tensors are not fp32 on CPU, or the one-time probe fails:
torch.mm / F.linear, unchanged.
The choice is process-wide while the context is held.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_on = False  # inside `enabled(True)`
_probe: bool | None = None  # oneDNN present and IEEE-exact here (checked once)


def _dnn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def available() -> bool:
    """oneDNN's linear exists in this torch build and gives fp32 products (checked once per process)."""
    global _probe
    if _probe is None:
        _probe = False
        try:
            if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
                g = torch.Generator().manual_seed(0)
                x, w = torch.randn(67, 130, generator=g), torch.randn(90, 130, generator=g)
                b = torch.randn(90, generator=g)
                ref = (x.double() @ w.double().t() + b.double()).float()
                _probe = bool(torch.allclose(_dnn(x, w, b), ref, rtol=1e-5, atol=1e-4)) and bool(
                    torch.allclose(_dnn(x, w.t().contiguous().t(), None), ref - b, rtol=1e-5, atol=1e-4)
                )
        except (RuntimeError, AttributeError):
            _probe = False
    return _probe


def pays() -> bool:
    """oneDNN beats MKL where torch runs AVX-512 kernels; restricted to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) the two
    measured within +-10% of each other, shape by shape, so elsewhere torch's BLAS stays."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def usable() -> bool:
    """What `perf.onednn_gemm: true` turns on here: oneDNN present, exact, and worth it on this CPU."""
    return available() and pays()


def active() -> bool:
    """Whether GEMMs started now go through oneDNN (autograd nodes store this at forward)."""
    return _on


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    global _on
    before = _on
    _on = bool(on) and usable()
    try:
        yield
    finally:
        _on = before


def fits(*ts: torch.Tensor | None) -> bool:
    """The tensors oneDNN takes here: fp32 on CPU (None counts as fitting: an absent bias)."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in ts)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, dnn: bool | None = None):
    """x (N, d_in) W^T (d_out, d_in) + b as a new (N, d_out) tensor; dnn=None: as the current context says."""
    if (active() if dnn is None else dnn) and x.dim() == 2 and fits(x, weight, bias):
        return _dnn(x, weight, bias)
    return F.linear(x, weight, bias)


def mm(a: torch.Tensor, b: torch.Tensor, dnn: bool | None = None) -> torch.Tensor:
    """a (N, K) @ b (K, M) as a new tensor (b may be a transposed view: no copy either way)."""
    if (active() if dnn is None else dnn) and a.dim() == b.dim() == 2 and fits(a, b):
        return _dnn(a, b.t(), None)
    return torch.mm(a, b)


class _Linear(torch.autograd.Function):
    """x W^T + b with both big GEMMs (forward, dX) through oneDNN; dW and db as autograd would compute them."""

    @staticmethod
    def forward(ctx, x2, weight, bias):  # (N, d_in), (d_out, d_in), (d_out,) | None
        # x is kept for dW only: a frozen layer (adapters, prompts, freeze's lower blocks) keeps nothing but W
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return _dnn(x2, weight, bias)

    @staticmethod
    def backward(ctx, dy):  # (N, d_out)
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _dnn(dy, weight.t(), None) if need_x else None
        dw = torch.mm(dy.t(), x2) if need_w else None
        db = dy.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if not (active() and fits(x, module.weight, module.bias) and x.dim() >= 2):
        return F.linear(x, module.weight, module.bias)
    x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
    out = _Linear.apply(x2, module.weight, module.bias)
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def linears(model: nn.Module, on: bool = True) -> Iterator[None]:
    """While held, the model's plain nn.Linear layers (no hooks) run `_Linear` whenever `active()`.

    The LM head is left alone (the fused loss scores it on supervised rows only), and so are wrapped layers
    (LoRA's own node takes the same GEMMs). Instance-level: other models in the process are not touched.
    """
    swapped: list[nn.Linear] = []
    if on and usable():
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for m in model.modules():
            plain = type(m) is nn.Linear and "forward" not in m.__dict__
            if plain and m is not head and not (m._forward_hooks or m._forward_pre_hooks):
                m.forward = _linear_forward.__get__(m)
                swapped.append(m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward
