"""The fused LM head + cross-entropy: the causal-LM loss on supervised rows, never a [tokens x vocab] tensor.

The objective (`objective.py`) hands it the hidden states of the supervised positions only; here they are scored
in chunks, and a plain Linear head's gradients come out of the forward pass. Returns the *sum* of token losses.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

from .. import gemm

# (512, 32000) fp32 logits = 66 MB, in one buffer kept per head weight (below). The head GEMM runs faster on
# more rows (B1 forward ~120 -> ~155 GFLOP/s from 256 to 512); 1024 transient chunks cost ~1 GB of peak RSS.
DEFAULT_CHUNK = 512

# head weight -> its (chunk, V) fp32 logits buffer, reused by every chunk of every pass. A fresh 66 MB block
# is above glibc's mmap ceiling (32 MB), so it would be mapped and page-faulted in anew each time; freed with
# the weight. Keyed by id (tensors compare elementwise), the weakref drops the entry when the weight dies; one
# table per thread, so two threads scoring with one head never share a buffer.
_local = threading.local()
KEEP_MAX_BYTES = 128 * 2**20  # largest buffer kept (512 rows of a 64k vocab); above it, transient logits
# oneDNN (gemm.py) writes each chunk's logits into a new tensor: chunks are cut to stay under glibc's largest
# mmap threshold (32 MB), so the block comes back from the heap each time instead of being mapped and
# page-faulted anew (B1: 262 rows of 32k fp32 logits; oneDNN runs them faster than MKL runs 512).
DNN_LOGITS_MAX_BYTES = 32 * 2**20 - 2**16


def _buffers() -> dict[int, tuple[weakref.ref, torch.Tensor]]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def _logits_into(
    hc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, dnn: bool = False
) -> torch.Tensor:
    """hc W^T + b as fp32 (n, V); on CPU fp32 written into the weight's reusable buffer (first n rows), or with
    dnn (fp32 CPU, `sftlab.gemm`) a new oneDNN tensor, kept small by the caller (DNN_LOGITS_MAX_BYTES)."""
    if dnn:
        return gemm.linear(hc, weight, bias, dnn=True)
    nbytes = rows * weight.shape[0] * 4  # big vocabularies: no buffer held for the model's life
    fp32 = weight.dtype == hc.dtype == torch.float32
    if weight.device.type != "cpu" or not fp32 or nbytes > KEEP_MAX_BYTES:
        return F.linear(hc, weight, bias).float()
    table, key = _buffers(), id(weight)
    ref, buf = table.get(key, (None, None))
    if ref is None or ref() is not weight or buf.shape[0] < rows or buf.shape[1] != weight.shape[0]:
        buf = torch.empty(rows, weight.shape[0], dtype=torch.float32)
        table[key] = (weakref.ref(weight, lambda _, k=key, t=table: t.pop(k, None)), buf)
    out = buf[: hc.shape[0]]
    if bias is None:
        return torch.mm(hc, weight.t(), out=out)
    return torch.addmm(bias, hc, weight.t(), out=out)


# Below this probability -log(p) loses digits to fp32 underflow; such rows are rescored exactly (rare).
_TINY = 1e-30


def _softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Row softmax written over the logits' own buffer on CPU: one fused kernel, no second (n, V) tensor.

    The CPU kernel reads a row (max, then sum of exps) before it writes it, so the aliasing is safe there; other
    devices' kernels are not checked here, so they get an ordinary softmax.
    """
    if logits.device.type != "cpu":
        return torch.softmax(logits, dim=1)
    return torch.ops.aten._softmax.out(logits, 1, False, out=logits)


def _target_nll(py, hc, weight, bias, yc) -> torch.Tensor:
    """sum_i -log p_i[y_i], exact (logsumexp - target logit) for the rows whose p underflowed."""
    tiny = py < _TINY
    if not bool(tiny.any()):
        return -py.log().sum()
    logits = F.linear(hc[tiny], weight, bias).float()  # (k, V), k rows only
    exact = torch.logsumexp(logits, -1) - logits.gather(1, yc[tiny][:, None]).squeeze(1)
    return -py[~tiny].log().sum() + exact.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, y_i), chunk by chunk, with the gradients computed in the same pass.

    Each chunk's logits (n, V) live only inside the loop: d(loss)/d(logits) = softmax - onehot is known as soon
    as the logits are, so it is turned into dh (and dW, db when they train) right away and the logits are
    dropped. Backward then only scales the stored gradients by the incoming scalar: no recomputation (the
    checkpointed path runs the head matmul three times, this one twice plus dW), and never a [N x V] tensor.
    The chunk's logits go into one buffer reused across chunks and passes (`_logits_into`); with oneDNN on
    (`sftlab.gemm`, fp32 CPU) they come from oneDNN in chunks of at most DNN_LOGITS_MAX_BYTES instead.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, y, chunk_size: int, need_grads: tuple[bool, bool, bool]):
        # h (N, H), weight (V, H), bias (V,) | None, y (N,)
        need_h, need_w, need_b = need_grads
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if need_h else None  # (N, H)
        gw = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )  # (V, H)
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None  # (V,)
        dnn = gemm.active() and gemm.fits(h, weight, bias)
        if dnn:
            chunk_size = min(chunk_size, max(1, DNN_LOGITS_MAX_BYTES // (4 * weight.shape[0])))
        for s in range(0, h.shape[0], chunk_size):
            hc, yc = h[s : s + chunk_size], y[s : s + chunk_size]  # (n, H), (n,)
            rows = torch.arange(hc.shape[0], device=h.device)
            p = _softmax_(
                _logits_into(hc, weight, bias, min(chunk_size, h.shape[0]), dnn)
            )  # (n, V), in place
            py = p[rows, yc]  # (n,)
            total += _target_nll(py, hc, weight, bias, yc)
            if need_h or need_w or need_b:
                p[rows, yc] -= 1.0  # (n, V) = dCE/dlogits
                gc = p.to(weight.dtype)
                if need_h and dnn:
                    gh[s : s + chunk_size] = gemm.mm(gc, weight, dnn=True)  # (n, H)
                elif need_h:
                    torch.mm(gc, weight, out=gh[s : s + chunk_size])  # (n, H)
                if need_w:
                    gw.addmm_(gc.T.float(), hc.float())  # (V, H)
                if need_b:
                    gb += p.sum(0)
            del p
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.has = (gh is not None, gw is not None, gb is not None)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        # The stored gradients are scaled in place: no second (V, H) fp32 block per pass for full fine-tuning
        # (66 MB on a 32k vocab, above malloc's mmap ceiling: page-faulted in anew every time). So only once.
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "the fused LM-head loss was backpropagated twice (retain_graph); set perf.fused_loss: false"
            )
        ctx.consumed = True
        saved = iter(ctx.saved_tensors)
        gh, gw, gb = (next(saved) if has else None for has in ctx.has)
        scale = grad_out.float()
        dh = gh.mul_(scale.to(gh.dtype)) if gh is not None else None
        dw = gw.mul_(scale).to(ctx.dtypes[0]) if gw is not None else None
        db = gb.mul_(scale).to(ctx.dtypes[1]) if gb is not None else None
        return dh, dw, db, None, None, None


def linear_cross_entropy_sum(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Summed cross-entropy of the linear head on rows h (N, H) against targets y (N,); fused, chunked."""
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and h.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _LinearCrossEntropy.apply(h, weight, bias, y, chunk_size, need)
