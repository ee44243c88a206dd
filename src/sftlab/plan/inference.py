"""Inference cost of a trained method against its base model, measured side by side: forward latency per example,
and for generation tasks greedy generation tokens/s.

Both are timed alternately with the base model (model, base, model, base, ...) after a warm-up, and the medians
taken, so a shared machine whose load drifts slows both alike and the ratio stays meaningful. Generation runs a
fixed number of new tokens (min = max new tokens, EOS ignored), so a model that stops early is not counted as
fast; prompts are the eval examples' prompt parts (the tokens before the first supervised one; the source for
seq2seq), left-padded into one batch for a decoder.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

GENERATION_TASKS = ("causal-lm", "seq2seq")


def _alternate(
    run_model: Callable[[], None], run_base: Callable[[], None], rounds: int
) -> tuple[float, float]:
    """Median seconds of run_model and of run_base, each timed `rounds` times, alternately, after one warm-up."""
    times: list[list[float]] = [[], []]
    run_model()
    run_base()
    for _ in range(rounds):
        for fn, ts in ((run_model, times[0]), (run_base, times[1])):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def latency(
    model: nn.Module, base: nn.Module, task: str, batches: list[dict], rounds: int = 3
) -> tuple[float, float]:
    """(model, base) seconds per example of a forward over `batches`."""
    from ..train.objective import Objective

    objs = [Objective(model, task), Objective(base, task)]
    for o in objs:
        o.eval()
    n = sum(int(b["input_ids"].shape[0]) for b in batches)

    def over(o) -> Callable[[], None]:
        def run() -> None:
            for b in batches:
                o(b)

        return run

    s, base_s = _alternate(over(objs[0]), over(objs[1]), rounds)
    return s / n, base_s / n


def prompts_of(examples: list[dict], task: str, n: int, max_len: int = 64) -> list[list[int]]:
    """The prompt parts of the first `n` encoded eval examples (their last `max_len` tokens)."""
    out = []
    for ex in examples[:n]:
        ids = list(ex["input_ids"])
        if task == "causal-lm":
            labels = ex.get("labels") or []
            first = next((i for i, t in enumerate(labels) if t != -100), None)
            ids = ids[: first if first else max(1, len(ids) // 2)]
        out.append(ids[-max_len:])
    return out


def _batch(prompts: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    pad = [[pad_id] * (width - len(p)) for p in prompts]
    ones = [[1] * len(p) for p in prompts]
    zeros = [[0] * (width - len(p)) for p in prompts]
    if left:
        return torch.tensor([a + p for a, p in zip(pad, prompts)]), torch.tensor(
            [z + o for z, o in zip(zeros, ones)]
        )
    return torch.tensor([p + a for a, p in zip(pad, prompts)]), torch.tensor(
        [o + z for z, o in zip(zeros, ones)]
    )


@torch.no_grad()
def generation_rate(
    model: nn.Module,
    base: nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    new_tokens: int = 16,
    rounds: int = 2,
) -> tuple[float, float]:
    """(model, base) new tokens per second of greedy generation of exactly `new_tokens` tokens after each prompt
    (one batch)."""
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    ids, mask = _batch(prompts, pad_id, left=not seq2seq)
    kw = {
        "do_sample": False,
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "pad_token_id": pad_id,
    }

    def gen(m: nn.Module) -> Callable[[], None]:
        m.eval()

        def run() -> None:
            m.generate(input_ids=ids, attention_mask=mask, **kw)

        return run

    s, base_s = _alternate(gen(model), gen(base), rounds)
    tokens = len(prompts) * new_tokens
    return tokens / s, tokens / base_s
