"""How long a training step takes on this CPU: each kind of work at the rate this machine runs it, measured now.

FLOPs alone (the old model: FLOPs / (matmul peak x 0.8)) missed by 33-55% for every frozen-base method, because
the work of a step does not all run at one rate. On the benchmark machine (AMD EPYC, 1 thread, llama-21m, torch
profiler per op) a step splits into:

  base GEMMs       y = x W^T forward and dX = dY W backward, through oneDNN (sftlab.gemm): the fastest path,
                   ~150 GFLOP/s. A frozen base runs only these: 2N forward + 2N backward, no weight gradients.
  weight grads     dW = dY^T X for every weight that trains, on torch.mm (MKL): ~100 GFLOP/s. Full fine-tuning
                   is 1/3 of its FLOPs here, at 2/3 the rate; the LM head's fp32 gradient (addmm_) likewise.
  thin products    LoRA's A/B and the adapters' down/up projections (rank r or bottleneck m): memory-bound
                   matmuls of width r, at a fraction of the GEMM rate that depends on r.
  attention        sdpa: per example, causal, unmasked where sftlab packs rows (train/varlen.py); over the padded
                   batch with a mask where it cannot (prompt and prefix tuning prepend virtual tokens, so packing
                   is off; seq-cls and seq2seq are padded too), a slower kernel.
  elementwise      norms, activations, residual adds, RoPE, dropout masks, the loss's softmax: bandwidth-bound.
                   Bytes: every tensor a block keeps for backward (plan/activations.py) is written in forward, read
                   in backward, and its gradient written and read: 4 touches; a block no gradient reaches writes
                   and reads the same tensors once: 2 touches; the loss reads and writes each logit 4 times.
  optimizer        fused AdamW + gradient clipping: per trainable parameter, every step, whatever the tokens.

So `calibrate` times each kind once (about a second), on the shapes of this plan's pass and the kernels training
calls (under bf16 autocast for `train.precision: bf16-mixed`, as training runs it: oneDNN off, every matmul cast
to bf16 and the block's projections' outputs in bf16), and `step_seconds` adds the parts up. Nothing here is fitted to a method: a method's time differs only by
how much of each kind of work it does. Rates are medians of a few repetitions (a shared machine's load moves
both the probe and the steps alike).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Probe sizes are capped so that a 70B plan on a laptop still calibrates in about a second.
MAX_ROWS = 1024
MAX_DIM = 2048


@dataclass
class Rates:
    """FLOP/s of each kind of work, bytes/s of elementwise work, seconds per trainable parameter per step."""

    gemm: float
    wgrad: float
    attention_varlen: float
    attention_masked: float
    bandwidth: float
    optimizer_s_per_param: float
    block_elementwise_train: float  # s per token per block: a block's elementwise ops, forward + backward
    block_elementwise_forward: float  # ... forward only (a block no gradient reaches)
    thin: dict[int, float] = field(default_factory=dict)  # width -> FLOP/s (probed for the plan's widths)

    def thin_rate(self, width: int) -> float:
        if width in self.thin:
            return self.thin[width]
        near = min(self.thin, key=lambda w: abs(w - width), default=None)
        return self.thin[near] if near is not None else self.wgrad

    def describe(self) -> str:
        g = 1e9
        return (
            f"measured now: base GEMMs {self.gemm / g:.0f}, weight grads {self.wgrad / g:.0f}, attention "
            f"{self.attention_varlen / g:.0f} (packed) / {self.attention_masked / g:.0f} (masked) GFLOP/s, "
            f"thin (width: GFLOP/s) {', '.join(f'{w}: {r / g:.0f}' for w, r in sorted(self.thin.items()))}, "
            f"block elementwise {self.block_elementwise_train * 1e6:.1f} us/token (forward only "
            f"{self.block_elementwise_forward * 1e6:.1f}), {self.bandwidth / g:.0f} GB/s, AdamW "
            f"{self.optimizer_s_per_param * 1e9:.2f} ns/param"
        )


def _median_time(fn: Callable[[], object], reps: int = 5, budget: float = 0.25) -> float:
    fn()  # warm-up (allocations, oneDNN primitive cache)
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < reps and (not times or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass(frozen=True)
class ProbeShape:
    rows: int  # tokens of a pass
    hidden: int
    ffn: int
    heads: int
    head_dim: int
    length: int  # an example's tokens (with prompt tuning's virtual ones)
    examples: int  # examples in the pass
    extra_keys: int  # prefix tuning's keys per attention call
    causal: bool


AUTOCAST = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def calibrate(
    ps: ProbeShape, threads: int | None = None, thin_widths: tuple[int, ...] = (), autocast: str | None = None
) -> Rates:
    """Time each kind of work once on this CPU, with `threads` threads (training's count); the thin products at
    each of `thin_widths` (LoRA ranks, adapter bottlenecks); `autocast`: a mixed `train.precision`."""
    from .. import gemm

    half = AUTOCAST.get(autocast) if autocast else None
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with (
            torch.no_grad(),
            gemm.enabled(half is None),
            torch.autocast("cpu", half, enabled=half is not None),
        ):
            return _calibrate(ps, gemm.active(), thin_widths, half)
    finally:
        torch.set_num_threads(before)


def _calibrate(
    ps: ProbeShape, onednn: bool, thin_widths: tuple[int, ...], half: torch.dtype | None = None
) -> Rates:
    g = torch.Generator().manual_seed(0)
    rows, h, f = min(ps.rows, MAX_ROWS), min(ps.hidden, MAX_DIM), min(ps.ffn, MAX_DIM)
    x = torch.randn(rows, h, generator=g)
    w = torch.randn(f, h, generator=g)
    dy = torch.randn(rows, f, generator=g)
    if onednn:
        linear = lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")  # noqa: E731
    else:
        linear = lambda: F.linear(x, w)  # noqa: E731
    gemm_rate = 2 * rows * h * f / _median_time(linear)
    wgrad_rate = 2 * rows * h * f / _median_time(lambda: torch.mm(dy.t(), x))

    def thin(width: int) -> float:
        """LoRA's / an adapter's six products of width r per linear, as its autograd runs them: forward t = x A^T,
        y = t B^T; backward dB = dy^T t, dt = dy B, dA = dt^T x, dx = dt A. 12 rows h r FLOPs."""
        a = torch.randn(width, h, generator=g)
        b = torch.randn(h, width, generator=g)
        dyh = torch.randn(rows, h, generator=g)

        def run() -> None:
            t = torch.mm(x, a.t())
            torch.mm(t, b.t())
            torch.mm(dyh.t(), t)
            dt = torch.mm(dyh, b)
            torch.mm(dt.t(), x)
            torch.mm(dt, a)

        return 12 * rows * h * width / _median_time(run)

    # attention, forward + backward, as sdpa runs it in training
    d, heads, n = ps.head_dim, ps.heads, ps.length

    def attention(masked: bool) -> float:
        with torch.enable_grad():
            if masked:
                b, keys = max(1, ps.rows // max(1, n)), n + ps.extra_keys
                q = torch.randn(b, heads, n, d, generator=g, requires_grad=True)
                k = torch.randn(b, heads, keys, d, generator=g, requires_grad=True)
                v = torch.randn(b, heads, keys, d, generator=g, requires_grad=True)
                mask = torch.ones(b, 1, n, keys, dtype=torch.bool)
                if ps.causal:
                    mask[..., ps.extra_keys :] = torch.ones(n, n, dtype=torch.bool).tril()

                def run() -> None:
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()

                flops = 3 * 4 * b * heads * n * keys * d
            else:
                b = max(1, ps.rows // max(1, n))
                q, k, v = (torch.randn(1, heads, n, d, generator=g, requires_grad=True) for _ in range(3))

                def run() -> None:
                    for _ in range(b):
                        F.scaled_dot_product_attention(q, k, v, is_causal=ps.causal).sum().backward()

                flops = 3 * 4 * b * heads * n * n * d
            return flops / _median_time(run, reps=3)

    big = torch.randn(1 << 24, generator=g)  # 64 MB: beyond the caches, as the loss's logits are
    out = torch.empty_like(big)
    bandwidth = 3 * big.numel() * 4 / _median_time(lambda: torch.mul(big, big, out=out), reps=3)
    ew_train, ew_fwd = _block_elementwise(rows, h, f, ps, g, half)

    p = torch.nn.Parameter(torch.randn(1 << 20, generator=g))
    p.grad = torch.randn(1 << 20, generator=g)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        opt.step()

    with torch.enable_grad():
        opt_s = _median_time(step) / p.numel()
    return Rates(gemm_rate, wgrad_rate, attention(False), attention(True), bandwidth, opt_s, ew_train, ew_fwd,
                 thin={w: thin(w) for w in sorted(set(thin_widths))})  # fmt: skip


def _block_elementwise(
    rows: int, h: int, f: int, ps: ProbeShape, g: torch.Generator, half: torch.dtype | None = None
) -> tuple[float, float]:
    """Seconds per token of one block's elementwise ops, forward + backward and forward only: two RMSNorms, RoPE on
    q and k, SiLU(gate) x up, two residual adds (a Llama block's; the other families' LayerNorm/GELU/dropout chains
    are of the same size). `half`: the projections' outputs (q/k, gate, up) in that dtype, as autocast makes them;
    the residual stream stays fp32."""
    qk = 2 * min(ps.heads * ps.head_dim, MAX_DIM)
    w1, w2 = torch.ones(h), torch.ones(h)
    cos, sin = (torch.randn(rows, qk, generator=g).to(half or torch.float32) for _ in range(2))

    def chain(x, qkv, gate, up):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w1
        r = qkv * cos + torch.cat([-qkv[:, qk // 2 :], qkv[:, : qk // 2]], 1) * sin
        m = F.silu(gate) * up
        x2 = x + y
        z = x2 * torch.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-6) * w2
        return (x2 + z).sum() + r.sum() + m.sum()

    def inputs(grad: bool):
        out = [torch.randn(rows, h, generator=g)] + [
            torch.randn(rows, n, generator=g).to(half or torch.float32) for n in (qk, f, f)
        ]
        return [t.requires_grad_(grad) for t in out]

    with torch.enable_grad():
        xs = inputs(True)
        train = _median_time(lambda: chain(*xs).backward(), reps=3)
    xs = inputs(False)
    fwd = _median_time(lambda: chain(*xs), reps=3)
    return train / rows, fwd / rows


@dataclass
class Work:
    """What one step does, by kind (see the module docstring): FLOPs, bytes, trainable parameters."""

    gemm: float = 0.0
    wgrad: float = 0.0
    thin: dict[int, float] = field(default_factory=dict)  # width -> FLOPs
    attention: float = 0.0
    masked_attention: bool = False
    elementwise_bytes: float = 0.0  # beyond the blocks' own ops: the loss, a method's extra tensors
    block_tokens_train: float = 0.0  # tokens x blocks a gradient flows through
    block_tokens_forward: float = 0.0  # tokens x blocks run forward only
    trainable: int = 0

    def add_thin(self, width: int, flops: float) -> None:
        if flops:
            self.thin[width] = self.thin.get(width, 0.0) + flops


def step_seconds(work: Work, rates: Rates) -> float:
    """Seconds of one step: each kind of work at its measured rate, added (one thread does them one by one)."""
    attn_rate = rates.attention_masked if work.masked_attention else rates.attention_varlen
    return (
        work.gemm / rates.gemm
        + work.wgrad / rates.wgrad
        + sum(fl / rates.thin_rate(wd) for wd, fl in work.thin.items())
        + work.attention / attn_rate
        + work.block_tokens_train * rates.block_elementwise_train
        + work.block_tokens_forward * rates.block_elementwise_forward
        + work.elementwise_bytes / rates.bandwidth
        + work.trainable * rates.optimizer_s_per_param
    )
