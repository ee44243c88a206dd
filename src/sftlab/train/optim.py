"""AdamW over trainable parameters only, and the warmup + cosine/linear/constant schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

# What torch's fused AdamW kernel takes; torch itself checks only at the first step().
FUSED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], fused: bool = True
) -> torch.optim.AdamW:
    """Frozen weights never reach the optimizer, so they get no state. Biases and norms are not decayed.

    fused: torch's single-kernel AdamW (CPU and CUDA) where the parameters allow it, else the multi-tensor one.
    The multi-tensor step builds full-size temporaries (sqrt of the second moment, the update): on B2's 58M
    parameters 197-275 ms and ~56k page faults per step on CPU, where the fused step takes 37-40 ms and none.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the method left no trainable parameters")
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    params = [p for g in groups for p in g["params"]]
    if fused and all(p.device.type in ("cpu", "cuda") and p.dtype in FUSED_DTYPES for p in params):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    opt: torch.optim.Optimizer, total: int, warmup: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, schedule))
