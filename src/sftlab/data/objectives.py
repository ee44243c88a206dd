"""Self-supervised objectives on token ids: causal-LM blocks, BERT's masking, T5's span corruption.

Pure functions. The only randomness is a numpy Generator the caller passes in; `example_rng` keys one by
(seed, stream, epoch, example index), so an example's masking in an epoch is the same whatever order the epoch's
batches run in, and a resumed run re-draws exactly what the interrupted one drew (no RNG state in checkpoints).

- `blocks`: documents concatenated and cut into consecutive fixed-size blocks, every token in exactly one block
  (the last block may be shorter). Causal LM: loss on every token (as GPT-style pretraining; documents are
  separated by EOS and attention crosses them inside a block, like `run_clm.py`'s `group_texts`).
- `mlm_mask`: BERT's dynamic masking (Devlin et al. 2019): each non-special token is chosen with probability p
  (0.15); a chosen token becomes the mask token 80% of the time, a random token 10%, stays itself 10%; the loss
  reads the chosen positions only.
- `noise_mask` / `span_corrupt`: T5's span corruption (Raffel et al. 2020, `random_spans_noise_mask` and
  `noise_span_to_unique_sentinel` of the T5 code): round(n x density) noise tokens in round(noise / mean) spans,
  span and gap lengths a random partition (every span and gap at least one token, the sequence starts with a gap
  and ends with a span); the input keeps the gaps with each span replaced by its own sentinel, the target is
  each sentinel followed by the span it replaced. `span_reconstruct` inverts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .batching import IGNORE

TRAIN, EVAL = (
    0,
    1,
)  # rng streams: training re-draws per epoch; the eval set is corrupted once, on its own stream
_SALT = 0x5E1F  # keeps these draws apart from the data order's (batching._rng)


def example_rng(seed: int, epoch: int, index: int, stream: int = TRAIN) -> np.random.Generator:
    """The generator for one example's corruption in one epoch: a pure function of its arguments."""
    return np.random.default_rng([seed & 0xFFFFFFFF, stream, epoch & 0xFFFFFFFF, index, _SALT])


def blocks(docs: Iterable[Sequence[int]], size: int) -> list[list[int]]:
    """The documents' tokens, concatenated, cut into blocks of `size` (the last one shorter when the total does not
    divide): concatenating the blocks gives back the concatenated documents exactly."""
    return list(iter_blocks(docs, size))


def iter_blocks(docs: Iterable[Sequence[int]], size: int) -> Iterator[list[int]]:
    """`blocks`, one at a time, as the documents arrive: a streamed corpus holds one block in hand, not all."""
    if size < 1:
        raise ValueError(f"block size must be >= 1 (got {size})")
    cur: list[int] = []
    for doc in docs:
        pos = 0
        while pos < len(doc):
            take = min(size - len(cur), len(doc) - pos)
            cur.extend(doc[pos : pos + take])
            pos += take
            if len(cur) == size:
                yield cur
                cur = []
    if cur:
        yield cur


def mlm_mask(
    ids: Sequence[int],
    rng: np.random.Generator,
    mask_id: int,
    replace_ids: np.ndarray,
    special_ids: np.ndarray,
    probability: float = 0.15,
) -> tuple[list[int], list[int]]:
    """(input ids, labels): BERT's 80/10/10 masking of the non-special tokens chosen with `probability`; labels
    hold the original token at chosen positions and IGNORE elsewhere. Random replacements come from
    `replace_ids` (the vocabulary without special tokens). Draws a fixed number of values per token, so one
    example's draws never depend on another's."""
    x = np.asarray(ids, dtype=np.int64)  # (T,)
    choose, how, pick = rng.random(len(x)), rng.random(len(x)), rng.integers(0, len(replace_ids), len(x))
    chosen = (choose < probability) & ~np.isin(x, special_ids)
    labels = np.where(chosen, x, IGNORE)
    out = x.copy()
    out[chosen & (how < 0.8)] = mask_id
    rand = chosen & (how >= 0.8) & (how < 0.9)
    out[rand] = replace_ids[pick[rand]]
    return out.tolist(), labels.tolist()


def span_counts(length: int, density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` (>= 2): T5's rounding, at least one of each, at least
    one kept token, and never more spans than there are noise tokens or kept tokens to separate them."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    return noise, min(spans, noise, length - noise)


def _segment(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random partition of n_items into n_segments non-empty runs."""
    first = np.zeros(n_items, dtype=bool)
    first[1:] = rng.permutation(np.arange(n_items - 1) < n_segments - 1)  # where runs 2..k begin
    return np.bincount(np.cumsum(first), minlength=n_segments)


def noise_mask(
    length: int, rng: np.random.Generator, density: float = 0.15, mean_span: float = 3.0
) -> np.ndarray:
    """(length,) bool, True on noise: gaps and spans alternate, starting with a gap and ending with a span."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens (got {length})")
    noise, spans = span_counts(length, density, mean_span)
    runs = np.stack([_segment(length - noise, spans, rng), _segment(noise, spans, rng)], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], spans), runs)


def span_corrupt(
    ids: Sequence[int],
    rng: np.random.Generator,
    sentinels: Sequence[int],
    density: float = 0.15,
    mean_span: float = 3.0,
) -> tuple[list[int], list[int]]:
    """(inputs, targets): each noise span replaced by its own sentinel in the inputs (sentinels[0] for the first
    span, ...); the targets list each sentinel followed by the tokens it replaced."""
    mask = noise_mask(len(ids), rng, density, mean_span)
    inputs: list[int] = []
    targets: list[int] = []
    k = -1
    for i, (t, noisy) in enumerate(zip(ids, mask)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                k += 1
                if k >= len(sentinels):
                    raise ValueError(f"{k + 1} noise spans but only {len(sentinels)} sentinel tokens")
                inputs.append(sentinels[k])
                targets.append(sentinels[k])
            targets.append(int(t))
        else:
            inputs.append(int(t))
    return inputs, targets


def span_reconstruct(inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int]) -> list[int]:
    """The original ids from span_corrupt's inputs and targets (sentinels must not occur in the text)."""
    index = {s: k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    k = None
    for t in targets:
        if t in index:
            k = index[t]
            spans[k] = []
        elif k is not None:
            spans[k].append(t)
    out: list[int] = []
    for t in inputs:
        out.extend(spans[index[t]] if t in index else [t])
    return out
