"""Loss on supervised positions only.

For causal LMs the LM head runs only where labels != -100, in chunks, so no [tokens x vocab] tensor
for prompt or pad positions is ever built. Every method keeps `model.base_model(...)` aligned with
`input_ids` (methods that prepend virtual tokens strip them from the base model's output), so this
one function serves all methods. Returns the *sum* of token losses and the token count, so the loop
can normalise per supervised token across a whole accumulated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
DEFAULT_CHUNK = 1024


def _head_ce_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum")


def causal_lm_loss(model: nn.Module, batch: dict, chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    # No KV cache in training: transformers isolates packed rows (position_ids restarting) only without one.
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    target = labels[:, 1:]
    mask = target != IGNORE
    h = hidden[:, :-1][mask]  # (N, H)
    y = target[mask]  # (N,)
    n = int(y.numel())
    head = model.get_output_embeddings()
    if n == 0:
        return hidden.sum() * 0.0, 0
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        hs, ys = h[start : start + chunk_size], y[start : start + chunk_size]
        if torch.is_grad_enabled() and n > chunk_size:
            # Recompute the chunk's logits in backward instead of keeping them alive.
            total = total + checkpoint(_head_ce_sum, head, hs, ys, use_reentrant=False)
        else:
            total = total + _head_ce_sum(head, hs, ys)
    return total, n


def naive_causal_lm_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """Reference: full logits over every position (what HF models do with labels=)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    logits, target = logits[:, :-1], labels[:, 1:]
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, n


def seq2seq_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]  # (B, T_out), -100 on pad
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, labels=labels)
    logits = out.logits.float()
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, n


def seq_cls_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]  # (B,)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    return F.cross_entropy(logits, labels, reduction="sum"), int(labels.numel())


def compute_loss(model: nn.Module, batch: dict, task: str, chunk_size: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, int]:
    """(sum of per-token losses, number of supervised tokens) for one micro-batch."""
    if task == "causal-lm":
        return causal_lm_loss(model, batch, chunk_size)
    if task == "seq2seq":
        return seq2seq_loss(model, batch)
    if task == "seq-cls":
        return seq_cls_loss(model, batch)
    raise ValueError(f"unknown task {task!r}")


def count_supervised(batch: dict, task: str) -> int:
    """Supervised targets in a micro-batch, known before any forward (for per-token normalisation)."""
    labels = batch["labels"]
    if task == "causal-lm":
        return int((labels[:, 1:] != IGNORE).sum())
    if task == "seq2seq":
        return int((labels != IGNORE).sum())
    return int(labels.numel())
