"""Loss / perplexity (LMs) and accuracy (classification) over encoded examples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import collate
from ..train.loss import compute_loss


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: list[dict], task: str, batch_size: int, pad_id: int, chunk_size: int = 1024
) -> dict:
    """Mean loss per supervised token over all examples (not a mean of batch means)."""
    was_training = model.training
    model.eval()
    total, n_tok, correct = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id, task)
        if task == "seq-cls":
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
            loss, n = F.cross_entropy(logits, batch["labels"], reduction="sum"), len(batch["labels"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        else:
            loss, n = compute_loss(model, batch, task, chunk_size)
        total += float(loss)
        n_tok += n
    model.train(was_training)
    out = {"eval_loss": total / max(1, n_tok), "eval_tokens": n_tok}
    if task != "seq-cls":
        out["eval_perplexity"] = math.exp(min(out["eval_loss"], 50.0))
    else:
        out["eval_accuracy"] = correct / max(1, len(examples))
    return out
