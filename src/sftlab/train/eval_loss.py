"""Held-out loss through the training objective: the numbers training reports and early stopping reads."""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from .objective import Objective


@torch.no_grad()
def eval_loss(objective: Objective, examples: list[dict], batch_size: int, pad_id: int) -> dict:
    """Mean loss per supervised token over all examples (not a mean of batch means); perplexity for LMs,
    accuracy for classification."""
    was_training = objective.training
    objective.eval()
    total, n_tok, correct = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id, objective.task)
        out = objective(batch)
        total += float(out.loss)
        n_tok += out.count
        correct += out.correct or 0
    objective.train(was_training)
    res = {"eval_loss": total / max(1, n_tok), "eval_tokens": n_tok}
    if objective.task == "seq-cls":
        res["eval_accuracy"] = correct / max(1, len(examples))
    else:
        res["eval_perplexity"] = math.exp(min(res["eval_loss"], 50.0))
    return res
