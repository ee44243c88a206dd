"""LoRA test inputs (tiny batches with one right-padded row) and an adapter randomiser, on tests/helpers.py."""

from __future__ import annotations

import torch
from helpers import random_inputs, with_labels


def inputs(task: str, batch: int = 3, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    return random_inputs(task, batch, seq, seed)


def train_batch(task: str, batch: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    return with_labels(inputs(task, batch, seq, seed=2), task)


@torch.no_grad()
def randomize(
    model, keys=("lora_B", "lora_magnitude_vector", "modules_to_save"), seed: int = 3, std: float = 0.1
):
    """Make an adapter's update non-zero (B, DoRA magnitude, saved-module copies), as training would."""
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if any(k in n for k in keys):
            p.add_(torch.randn(p.shape, generator=g) * std)
