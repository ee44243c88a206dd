"""Batch order and collation.

Orders are pure functions of (seed, epoch), so a resumed run replays exactly the batches it would have seen.
Length grouping follows HF's LengthGroupedSampler: shuffle, sort by length inside mega-chunks of
`MEGA x batch_size` examples, cut into batches, shuffle the batch order, and put the batch holding the
longest example first (an out-of-memory shows up at step 1, not hours in).
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100  # the label of a position that gets no loss (torch's ignore_index); its one definition
TASK_KEY = "task"  # a multi-task example's task index (data/tasks.py); collated into `task_ids`
WEIGHT_KEY = "weight"  # an example's loss weight (data.weight_field); collated into `example_weights`
MEGA = 50  # mega-chunk = MEGA batches: enough to group lengths, small enough to keep randomness


def example_lengths(examples: list[dict]) -> list[int]:
    """Per-example cost for batching: the longer of the input and (seq2seq) label sequence."""
    return [
        max(len(ex["input_ids"]), len(ex["labels"]) if isinstance(ex["labels"], list) else 0)
        for ex in examples
    ]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5F7])


def _longest_first(batches: list[list[int]], lengths: list[int]) -> list[list[int]]:
    if not batches:
        return batches
    top = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches[0], batches[top] = batches[top], batches[0]
    return batches


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True
) -> list[list[int]]:
    """Example indices per batch for one epoch: every index exactly once, deterministic in (seed, epoch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    rng = _rng(seed, epoch)
    perm = rng.permutation(len(lengths)).tolist()
    if not group_by_length:
        return [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    mega = MEGA * batch_size
    batches: list[list[int]] = []
    for m in range(0, len(perm), mega):
        chunk = sorted(perm[m : m + mega], key=lambda i: -lengths[i])  # stable: ties keep shuffled order
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return _longest_first(batches, lengths)


def token_budget_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-grouped batches whose padded size (count x longest) stays within `max_tokens`.

    The padded size bounds the packed size too, so the budget holds for `collate` and `collate_packed`.
    """
    if lengths and max(lengths) > max_tokens:
        raise ValueError(
            f"max_tokens={max_tokens} is smaller than the longest example ({max(lengths)} tokens); "
            "raise it to at least data.max_length"
        )
    rng = _rng(seed, epoch)
    perm = rng.permutation(len(lengths)).tolist()
    mean_len = max(1, round(sum(lengths) / max(1, len(lengths))))
    mega = MEGA * max(1, max_tokens // mean_len)  # about MEGA batches per sorted chunk
    batches: list[list[int]] = []
    for m in range(0, len(perm), mega):
        chunk = sorted(perm[m : m + mega], key=lambda i: -lengths[i])
        cur: list[int] = []
        for i in chunk:  # descending lengths: the first index of `cur` is its longest
            if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
    batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return _longest_first(batches, lengths)


def balanced_parts(idx: list[int], lengths: list[int], cap: int, packed: bool) -> list[list[int]]:
    """One batch cut into consecutive passes of tensor-token cost <= cap (a lone example may exceed it).

    As few passes as a greedy fill needs, with the largest as small as possible: peak activation memory is set
    by the largest pass, so 8 rows of ~137 tokens under cap 1,024 become 4 + 4, not 7 + 1. Cost is the summed
    length when packed, count x longest when padded.
    """
    n_parts = len(_fill(idx, lengths, cap, packed))
    lo, hi = (
        1,
        cap,
    )  # the smallest cap that still needs only n_parts passes (the count only falls as cap grows)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_fill(idx, lengths, mid, packed)) <= n_parts:
            hi = mid
        else:
            lo = mid + 1
    return _fill(idx, lengths, lo, packed)


def _fill(idx: list[int], lengths: list[int], cap: int, packed: bool) -> list[list[int]]:
    """Greedy consecutive parts of cost <= cap: the fewest parts any consecutive cut can have."""
    parts: list[list[int]] = [[]]
    total = longest = 0  # of the open part: summed and longest length
    for i in idx:
        n = lengths[i]
        cost = total + n if packed else max(longest, n) * (len(parts[-1]) + 1)
        if parts[-1] and cost > cap:
            parts.append([])
            total = longest = 0
        parts[-1].append(i)
        total, longest = total + n, max(longest, n)
    return parts


def _pad(seqs: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)  # (B, T)
    for r, s in enumerate(seqs):
        if not s:
            continue
        if side == "left":
            out[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        else:
            out[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(
    examples: list[dict], pad_id: int, task: str, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad a list of encoded examples into tensors: input_ids/attention_mask (B, T), labels (B, T) | (B,)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right' (got {padding_side!r})")
    ids = [ex["input_ids"] for ex in examples]
    batch = {
        "input_ids": _pad(ids, pad_id, padding_side),
        "attention_mask": _pad([[1] * len(s) for s in ids], 0, padding_side),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = _pad([ex["token_type_ids"] for ex in examples], 0, padding_side)
    if task == "seq-cls":
        batch["labels"] = torch.tensor([int(ex["labels"]) for ex in examples], dtype=torch.long)  # (B,)
    elif task == "seq2seq":
        batch["labels"] = _pad([ex["labels"] for ex in examples], IGNORE, "right")  # (B, T_out)
    elif task in ("causal-lm", "masked-lm"):  # masked-lm: the original token at masked positions, else IGNORE
        batch["labels"] = _pad([ex["labels"] for ex in examples], IGNORE, padding_side)  # (B, T)
    else:
        raise ValueError(f"unknown task {task!r}")
    if (
        TASK_KEY in examples[0]
    ):  # multi-task: each row's task, for routing to its head/adapter and its loss weight
        batch["task_ids"] = torch.tensor([ex[TASK_KEY] for ex in examples], dtype=torch.long)  # (B,)
    if WEIGHT_KEY in examples[0]:  # per-example loss weights (the objective applies them in training only)
        batch["example_weights"] = torch.tensor([float(ex[WEIGHT_KEY]) for ex in examples])  # (B,)
    return batch


def collate_packed(examples: list[dict], task: str = "causal-lm") -> dict[str, torch.Tensor]:
    """Padding-free batch: all examples in one row (1, sum T_i), position_ids restarting at 0 per example.

    No attention_mask: transformers >= 5 isolates packed sequences from position_ids, but only when no KV
    cache is in play: run the model with `use_cache=False` (or `model.config.use_cache = False`), else it
    builds a DynamicCache and examples attend to each other (measured: tiny-llama/gpt2 hidden states off
    by ~2.0). The label at each example's first position is -100, so the shifted loss never predicts
    across an example boundary.
    """
    if task != "causal-lm":
        raise ValueError(f"packed batches are for causal-lm only (got task {task!r})")
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        pos += range(n)
        labels += [IGNORE, *ex["labels"][1:]] if n else []
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([pos], dtype=torch.long),  # (1, N)
        "labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
    }
    if examples and TASK_KEY in examples[0]:  # multi-task: each token's task (a row holds several examples)
        batch["task_ids"] = torch.tensor(
            [[ex[TASK_KEY] for ex in examples for _ in ex["input_ids"]]]
        )  # (1, N)
    if examples and WEIGHT_KEY in examples[0]:  # each token carries its example's loss weight
        batch["example_weights"] = torch.tensor(
            [[float(ex[WEIGHT_KEY]) for ex in examples for _ in ex["input_ids"]]]
        )  # (1, N)
    return batch
