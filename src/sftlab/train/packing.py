"""Decide whether padding-free (packed) batches are safe for this model + method, by checking, not by name.

Packing puts a micro-batch's examples in one row with position_ids restarting per example; transformers >= 5
keeps them apart in attention only when the model builds its mask through `masking_utils` and no KV cache is
used. Methods that prepend virtual tokens (prompt, P-tuning, prefix) cannot honour that. A two-example forward
(a few tokens, no grad, eval mode: no RNG is drawn) tells us for sure.
"""

from __future__ import annotations

from itertools import islice

import torch
from torch import nn

from ..data.batching import collate_packed

PROBE_LEN = 6


@torch.no_grad()
def packed_rows_isolated(model: nn.Module, examples: list[dict]) -> tuple[bool, str]:
    """(ok, reason): does the second of two packed examples see exactly what it sees alone?"""
    # the first two examples of 2+ tokens, stopping there (a streamed corpus is not read through)
    seqs = list(islice((e["input_ids"][:PROBE_LEN] for e in examples if len(e["input_ids"]) >= 2), 2))
    if len(seqs) < 2:
        return False, "not enough examples to check packing"
    was_training = model.training
    model.eval()
    try:
        batch = collate_packed([{"input_ids": s, "labels": s} for s in seqs])
        packed = model.base_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).last_hidden_state  # (1, T1 + T2, H)
        alone = model.base_model(
            input_ids=torch.tensor([seqs[1]]), use_cache=False
        ).last_hidden_state  # (1, T2, H)
    except Exception as e:  # a method that refuses packed rows says so by raising
        return False, f"{type(e).__name__}: {e}"
    finally:
        model.train(was_training)
    if packed.shape[1] != len(seqs[0]) + len(seqs[1]):
        return False, "the model's output is not aligned with the packed row"
    tail = packed[:, len(seqs[0]) :].float()
    ok = torch.allclose(tail, alone.float(), rtol=1e-3, atol=1e-3)
    return ok, "" if ok else "packed examples attend to each other in this model"


def resolve_packing(
    requested: bool | None, task: str, model: nn.Module, examples: list[dict], log=print
) -> bool:
    """The packing setting to use: explicit false wins; true must pass the check; null (auto) falls back quietly."""
    if requested is False or task != "causal-lm":
        if requested and task != "causal-lm":
            raise ValueError(
                f"perf.packing is for causal-lm only (task is {task!r}); set perf.packing: false"
            )
        return False
    ok, why = packed_rows_isolated(model, examples)
    if ok:
        return True
    if requested:
        raise ValueError(
            f"perf.packing: true, but packed rows are not isolated here ({why}); set it to false"
        )
    log(f"packing off: {why}")
    return False
