"""Shared setup for the prefix / P-tuning / prompt tuning tests: tiny models, batches, PEFT twins."""

from __future__ import annotations

import copy

import torch

from sftlab.methods import MethodContext, get_method
from sftlab.models import build_tiny

FAMILIES = [
    ("tiny-llama", "causal-lm"),
    ("tiny-gpt2", "causal-lm"),
    ("tiny-bert", "seq-cls"),
    ("tiny-t5", "seq2seq"),
]
GEN_FAMILIES = [("tiny-llama", "causal-lm"), ("tiny-gpt2", "causal-lm"), ("tiny-t5", "seq2seq")]
METHODS = ["prefix", "ptuning", "prompt"]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}


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
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[-1, -3:] = 0
    else:
        mask[-1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        out["decoder_input_ids"] = torch.randint(4, 260, (batch, 4), generator=g)
    return out


def train_batch(task: str) -> dict[str, torch.Tensor]:
    b = inputs(task, batch=4, seq=10, seed=2)
    if task == "causal-lm":
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    elif task == "seq-cls":
        b["labels"] = torch.tensor([0, 1, 1, 0])
    else:
        b["labels"] = b.pop("decoder_input_ids")
    return b


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def real_positions(logits: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    """Logits at non-padding positions (causal LM), everything otherwise."""
    if task != "causal-lm":
        return logits
    return logits[batch["attention_mask"].bool()]
