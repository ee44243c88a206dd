"""Compiled elementwise kernels for the decoder's RMSNorms and gated MLP product, on while training runs.

Why: once the LM head, padding and LoRA are fast, a step is mostly GEMM and much of the rest is eager
elementwise work: an RMSNorm is five kernels forward and more backward, each a full pass over the activations,
and `act(gate) * up` three. `torch.compile` turns each into one loop forward and one backward (CPU, 1024 tokens:
RMSNorm fwd+bwd 2.9 -> 0.6 ms, SiLU*up 3.5 -> 1.8 ms). Only these small pure functions are compiled, with
dynamic shapes, so packed passes of any length reuse one compiled kernel and the GEMMs, attention and the
methods' own code stay eager. Off by default (`train.fuse_elementwise`): on the CPU B1 benchmark the compiled
calls' fixed overhead (guards, autograd wrappers) eats the saving, so the step time stays within noise.

Safety: a module is patched only when its class looks like one we know (an `*RMSNorm` with weight and eps; an
MLP with gate/up/down projections and a SiLU) *and* its patched forward reproduces the original on a probe
input, so a variant with a different formula (Gemma's 1 + weight, say) is left alone. If compilation fails
(no C++ compiler, an unsupported platform) everything stays eager and one line says why. `fused()` undoes the
patches on exit, so saving, evaluation and generation after training run the model as loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

_EAGER: dict[str, Callable] = {}  # name -> the plain function (the fallback and the formula to match)
_compiled: dict[str, Callable] = {}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Llama's formula (fp32 statistics, cast back before the weight), which every patched module must match
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


_EAGER.update(rms_norm=_rms_norm, silu_mul=_silu_mul)


class _Kernel:
    """The compiled function, falling back to the eager one for good if a later (re)compile ever fails."""

    def __init__(self, name: str, log: Callable[[str], None]):
        self.name, self.log = name, log
        self.eager = _EAGER[name]
        self.fn = torch.compile(self.eager, dynamic=True, fullgraph=True)

    def __call__(self, *args):
        try:
            return self.fn(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager formula is always right
            if self.fn is self.eager:
                raise
            self.fn = self.eager
            self.log(f"fused {self.name} kernel off ({type(e).__name__}); continuing eager")
            return self.eager(*args)


def _kernel(name: str, log: Callable[[str], None]) -> Callable:
    if name not in _compiled:
        _compiled[name] = _Kernel(name, log)
    return _compiled[name]


def _norm_eps(m: nn.Module) -> float | None:
    if not type(m).__name__.endswith("RMSNorm"):
        return None
    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float):
        return None
    return eps


def _is_gated_silu_mlp(m: nn.Module) -> bool:
    if not all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj")):
        return False
    act = getattr(m, "act_fn", None)
    if not callable(act):
        return False
    t = torch.linspace(-6, 6, 97)
    return bool(torch.allclose(act(t), F.silu(t), atol=1e-6))


def _norm_forward(m: nn.Module, eps: float, kernel: Callable) -> Callable:
    return lambda x: kernel(x, m.weight, eps)


def _mlp_forward(m: nn.Module, kernel: Callable) -> Callable:
    return lambda x: m.down_proj(kernel(m.gate_proj(x), m.up_proj(x)))


def _same_on_probe(m: nn.Module, new: Callable, width: int) -> bool:
    """Values and input gradients equal the original's; compiles the training (and eval) kernels up front."""
    p = next(m.parameters())
    x = torch.randn(1, 3, width, dtype=p.dtype, device=p.device, requires_grad=True)
    with torch.enable_grad():
        ref, got = m(x), new(x)
        if ref.shape != got.shape or not torch.allclose(ref, got, rtol=1e-4, atol=1e-5):
            return False
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        (g_got,) = torch.autograd.grad(got.sum(), x)
    with torch.no_grad():
        new(x)
    return bool(torch.allclose(g_ref, g_got, rtol=1e-4, atol=1e-5))


def _candidates(model: nn.Module, log: Callable[[str], None]) -> list[tuple[nn.Module, Callable, int]]:
    out = []
    for m in model.modules():
        eps = _norm_eps(m)
        if eps is not None:
            out.append((m, _norm_forward(m, eps, _kernel("rms_norm", log)), m.weight.shape[0]))
        elif _is_gated_silu_mlp(m) and hasattr(m.gate_proj, "in_features"):
            out.append((m, _mlp_forward(m, _kernel("silu_mul", log)), m.gate_proj.in_features))
    return out


def patch(model: nn.Module, log: Callable[[str], None] = print) -> list[nn.Module]:
    """Swap in compiled forwards where they provably match; returns the patched modules (for `unpatch`)."""
    cands = _candidates(model, log)
    if not cands:
        return []
    patched: list[nn.Module] = []
    checked: dict[tuple, bool] = {}  # one probe per (class, width): the modules of a class share the formula
    try:
        for m, new, width in cands:
            key = (type(m), width)
            if key not in checked:
                checked[key] = _same_on_probe(m, new, width)
            if checked[key]:
                m.forward = new
                patched.append(m)
    except Exception as e:  # compiler missing or unsupported: the eager model is always correct
        unpatch(patched)
        log(f"fused elementwise kernels off ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        return []
    return patched


def unpatch(modules: list[nn.Module]) -> None:
    for m in modules:
        if "forward" in m.__dict__:
            del m.forward


@contextlib.contextmanager
def fused(model: nn.Module, on: bool, log: Callable[[str], None] = print) -> Iterator[int]:
    """Patched for the duration of the block; yields how many modules run compiled kernels."""
    mods = patch(model, log) if on else []
    try:
        yield len(mods)
    finally:
        unpatch(mods)
