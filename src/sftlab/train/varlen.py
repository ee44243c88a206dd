"""Attention over a packed row, one example at a time, instead of one masked T x T product.

A padding-free row holds k examples of lengths T_1..T_k. transformers isolates them with a dense block-causal
mask over the whole row, so sdpa does (sum T_i)^2 work (measured: ~40% of a B1 step at 8 examples per row) and
cannot use its causal fast path. Here each example's slice runs causal sdpa on its own: sum T_i^2 work, no mask.

How it is wired: while `registered()` is held (by `train/patches.applied`, for a fit), the "sdpa" entry of
transformers' attention registry is wrapped; the wrapper is a pass-through unless the call carries
`sftlab_segments` (a tuple of row offsets), which the objective (`train/objective.py`) passes to the backbone for
packed batches only. On exit the original entry is put back. Models whose attention does not forward **kwargs never see it and
keep the masked (equally correct, slower) path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

KWARG = "sftlab_segments"
_installed = False  # inside `registered()`


def segments_from_positions(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Row offsets (0, e_1, ..., T) of the examples in a (1, T) packed row: a new example wherever position is 0."""
    pos = position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return (*starts, int(pos.shape[0]))


def _varlen_sdpa(module, query, key, value, segments, dropout=0.0, scaling=None):
    # query (1, Hq, T, D), key/value (1, Hkv, T, D) -> (1, T, Hq, D) like transformers' sdpa_attention_forward
    gqa = query.shape[1] != key.shape[1]
    # split, not slices: its backward is one cat of the pieces' grads, where n slices would each zero-fill and
    # add into a full-size (1, H, T, D) gradient (n x 3 x layers extra passes over q/k/v per step)
    sizes = [e - s for s, e in zip(segments[:-1], segments[1:])]

    def pieces(t):  # split along T in (1, T, H, D), the projections' layout: backward cats grads into it
        return [p.transpose(1, 2) for p in t.transpose(1, 2).split(sizes, 1)]

    outs = []
    for q, k, v in zip(pieces(query), pieces(key), pieces(value)):
        o = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1, enable_gqa=gqa
        )  # (1, H, T_i, D)
        outs.append(o.transpose(1, 2))  # (1, T_i, H, D): the CPU kernel's own memory layout, so no copy
    # one cat along T gives the (1, T, H, D) result directly (not a cat in (1, H, T, D) and a transposing copy)
    return torch.cat(outs, dim=1), None


def is_registered() -> bool:
    """Whether the wrapper is in the registry now (callers pass KWARG only then)."""
    return _installed


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """For the block: the registry's "sdpa" function also takes KWARG; without it, the original runs unchanged."""
    global _installed
    if _installed:  # nested: the outer block owns the entry
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa_or_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        segments = kwargs.pop(KWARG, None)
        if segments is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
            return original(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        return _varlen_sdpa(module, query, key, value, segments, dropout, scaling)

    ALL_ATTENTION_FUNCTIONS.register("sdpa", sdpa_or_varlen)
    _installed = True
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS.register("sdpa", original)
        _installed = False
