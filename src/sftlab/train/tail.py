"""The last block's MLP runs only on the positions the loss reads.

Why: in a causal LM the last block's output at position t reaches the loss only through the LM head at t, and
the head runs only where labels[t+1] != -100 (see objective.py). So the last MLP, two thirds of a block's matmuls,
can skip every prompt position: on B1 (47% of tokens supervised) half of one block's MLP, forward and backward.
Skipped positions leave the MLP with zeros (the block's output there is its residual alone): values nobody
reads, so the loss and every gradient are exactly those of the full computation (tested).

How: a forward pre-hook on the last block's `mlp` selects the columns (positions) any row supervises, and a
forward hook scatters the result back to full length; both are removed after the forward. Not used when the
MLP input is not aligned with the labels (methods that prepend virtual tokens) or when activation
checkpointing would recompute the block without the hooks.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn


def last_mlp(body: nn.Module) -> nn.Module | None:
    """The `mlp` of the last block: the longest ModuleList of blocks that each have an `mlp`."""
    best = None
    for m in body.modules():
        if (
            isinstance(m, nn.ModuleList)
            and len(m)
            and all(isinstance(getattr(b, "mlp", None), nn.Module) for b in m)
        ):
            if best is None or len(m) > len(best):
                best = m
    return best[-1].mlp if best is not None else None


_plain: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mlp -> returns one (B, T, H') tensor


def _returns_one_tensor(mlp: nn.Module, x: torch.Tensor) -> bool:
    """Once per module: a one-position probe, so an MLP returning a tuple (MoE routers) is never trimmed."""
    if mlp not in _plain:
        # RNG forked: a probe through dropout must not shift the run's random stream (resume is bit-identical)
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            out = mlp.forward(x[:, :1])
        _plain[mlp] = isinstance(out, torch.Tensor) and out.shape[:2] == x[:, :1].shape[:2]
    return _plain[mlp]


def checkpointed(body: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in body.modules())


@contextlib.contextmanager
def supervised_only(body: nn.Module, read: torch.Tensor, on: bool = True) -> Iterator[None]:
    """During the block: the last MLP sees only positions where read (B, T) is true in some row.

    on=False under activation checkpointing (the caller checks `checkpointed`): recomputation runs without hooks.
    """
    mlp = last_mlp(body) if on else None
    if mlp is None:
        yield
        return
    cols = read.any(0).nonzero().flatten()  # (T',)
    seq_len = read.shape[1]
    if cols.numel() in (0, seq_len):
        yield
        return
    state = {"full": None}

    def pre(_m, args):
        x = args[0]  # (B, T, H)
        if x.dim() != 3 or x.shape[1] != seq_len or not _returns_one_tensor(_m, x):
            state["full"] = None  # not aligned with the labels: run the MLP as usual
            return None
        state["full"] = x.shape
        return (x.index_select(1, cols), *args[1:])

    def post(_m, _args, out):
        shape = state["full"]
        if shape is None:
            return None
        return out.new_zeros(shape[:2] + out.shape[2:]).index_copy(1, cols, out)

    handles = (mlp.register_forward_pre_hook(pre), mlp.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
