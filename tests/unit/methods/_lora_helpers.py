"""Shared inputs and utilities for the LoRA tests (tiny models, tiny batches)."""

from __future__ import annotations

import copy
from functools import cache

import torch

from sftlab.models import build_tiny

FAMILIES = [
    ("tiny-llama", "causal-lm"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-bert", "seq-cls"),
    ("tiny-t5", "seq2seq"),
]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


@cache
def _built(name: str, task: str):
    model, _ = build_tiny(name, task, 2 if task == "seq-cls" else None)
    return model.eval()


def tiny(name: str, task: str):
    """A fresh copy of the seeded tiny model (deepcopy: much cheaper than re-initialising on a busy CPU)."""
    return copy.deepcopy(_built(name, task))


def inputs(task: str, batch: int = 3, seq: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, -3:] = 0  # one right-padded row
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(4, 260, (batch, 5), generator=g)
    return out


def train_batch(task: str, batch: int = 4, seq: int = 12) -> dict[str, torch.Tensor]:
    b = inputs(task, batch, seq, seed=2)
    if task == "causal-lm":
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    elif task == "seq-cls":
        b["labels"] = torch.tensor([0, 1, 1, 0][:batch])
    else:
        b["labels"] = b.pop("decoder_input_ids")
    return b


@torch.no_grad()
def logits(model, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**x).logits


@torch.no_grad()
def randomize(
    model, keys=("lora_B", "lora_magnitude_vector", "modules_to_save"), seed: int = 3, std: float = 0.1
):
    """Make an adapter's update non-zero (B, DoRA magnitude, saved-module copies), as training would."""
    g = torch.Generator().manual_seed(seed)
    for n, p in sorted(model.named_parameters()):
        if any(k in n for k in keys):
            p.add_(torch.randn(p.shape, generator=g) * std)
