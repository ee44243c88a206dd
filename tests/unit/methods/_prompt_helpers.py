"""Shared setup for the prefix / P-tuning / prompt tuning tests: tiny models, batches, PEFT twins."""

from __future__ import annotations

import copy

import torch
from helpers import random_inputs, with_labels

from sftlab.methods import MethodContext, get_method
from sftlab.models import build_tiny

GEN_FAMILIES = [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm"), ("tiny-t5", "seq2seq")]
METHODS = ["prefix", "ptuning", "prompt"]


def base(name: str, task: str):
    model, tok = build_tiny(name, task, 2 if task == "seq-cls" else None)
    return model.eval(), tok


def applied(name: str, task: str, method: str, **cfg):
    """(base model, method-applied deep copy, method config, context)."""
    model, tok = base(name, task)
    spec = get_method(method)
    config = spec.config(**{"num_virtual_tokens": 3, **cfg})
    ctx = MethodContext(task=task, tokenizer=tok, base_model_name=name)
    tuned = copy.deepcopy(model)
    spec.apply(tuned, config, ctx)
    return model, tuned, config, ctx


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float = 0.5, seed: int = 3) -> None:
    """Non-trivial values for every trainable tensor (method parameters and seq-cls heads)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def inputs(
    task: str, batch: int = 3, seq: int = 7, seed: int = 1, pad: str = "right"
) -> dict[str, torch.Tensor]:
    """One row padded on `pad`'s side with pad id 0; seq2seq decoder ids (batch, 4)."""
    return random_inputs(task, batch, seq, seed, pad=pad, pad_id=0, dec_len=4)


def train_batch(task: str) -> dict[str, torch.Tensor]:
    return with_labels(inputs(task, batch=4, seq=10, seed=2), task)


def padded(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of variable-length rows padded with id 0 on `side`."""
    n = max(map(len, rows))
    pads = [[0] * (n - len(r)) for r in rows]
    ids = [p + r if side == "left" else r + p for p, r in zip(pads, rows)]
    mask = [
        [0] * len(p) + [1] * len(r) if side == "left" else [1] * len(r) + [0] * len(p)
        for p, r in zip(pads, rows)
    ]
    return torch.tensor(ids), torch.tensor(mask)


def real_positions(logits: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    """Logits at non-padding positions (causal LM), everything otherwise."""
    if task != "causal-lm":
        return logits
    return logits[batch["attention_mask"].bool()]
