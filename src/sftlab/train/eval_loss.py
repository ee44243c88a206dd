"""Held-out loss through the training objective: the numbers training reports and early stopping reads.

In a distributed run each process evaluates a share of the eval set and the sums are all-reduced, so every rank gets
the one-process numbers (early stopping agrees). The one-process batches (sorted by length, `batch_size` each) are
dealt round-robin over the ranks, each batch whole: a batch's loss sum, token and correct counts are the ones one
process computes for it, and adding float32 batch sums in float64 (here and in the all-reduce) rounds nothing for
any realistic eval set (float32 has 24 mantissa bits, float64 53), so the result does not depend on the order.
"""

from __future__ import annotations

import math

import torch

from ..data.batching import collate
from .device import module_device
from .distributed import Dist, all_sum
from .objective import Objective


def eval_batches(order: list[int], batch_size: int) -> list[list[int]]:
    """The one-process eval batches: `order` cut into runs of `batch_size`."""
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def my_batches(batches: list, d: Dist | None) -> tuple[list, int]:
    """(this rank's batches, how many forwards it runs): batches r, r + N, r + 2N, ... on rank r of N. Under FSDP every
    forward is a collective (it all-gathers the weights), so every rank runs as many forwards as the busiest one (the
    extra ones are stand-ins whose results are dropped); under DDP the eval forward is local."""
    if d is None or not d.active:
        return batches, len(batches)
    mine = batches[d.rank :: d.world]
    return mine, (-(-len(batches) // d.world) if d.kind == "fsdp" else len(mine))


@torch.no_grad()
def eval_loss(
    objective: Objective, examples: list[dict], batch_size: int, pad_id: int, d: Dist | None = None
) -> dict:
    """Mean loss per supervised token over all examples (not a mean of batch means); perplexity for LMs,
    accuracy for classification. `d`: a distributed run's place, each rank evaluating its share (module docstring)."""
    was_training = objective.training
    objective.eval()
    total, n_tok, correct = 0.0, 0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    batches = eval_batches(order, batch_size)
    mine, forwards = my_batches(batches, d)
    for k in range(forwards):
        idx = mine[k] if k < len(mine) else batches[0]  # past its share: an FSDP stand-in, not counted
        out = objective(collate([examples[i] for i in idx], pad_id, objective.task))
        if k < len(mine):
            total += float(out.loss)  # fp32 sum, added in float64
            n_tok += out.count
            correct += out.correct or 0
    objective.train(was_training)
    if d is not None and d.active:
        total, n_tok, correct = all_sum([total, n_tok, correct], module_device(objective), d)
        n_tok, correct = int(n_tok), int(correct)
    res = {"eval_loss": total / max(1, n_tok), "eval_tokens": n_tok}
    if objective.task == "seq-cls":
        res["eval_accuracy"] = correct / max(1, len(examples))
    else:
        res["eval_perplexity"] = math.exp(min(res["eval_loss"], 50.0))
    return res
