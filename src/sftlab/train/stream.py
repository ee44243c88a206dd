"""The sampler: which examples each optimizer step sees, cut into passes and collated.

Orders are pure functions of (seed, epoch) (`data/batching.py`) and the position (epoch, batch index) lives in
the loop state that checkpoints save, so a resumed run continues the exact data order. A `transform` (the
self-supervised objectives' masking or span corruption, `data/corpus.py`) rewrites each example as it is
collated, from (example, epoch, index) alone, so it is re-drawn every epoch and resumes exactly too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import PerfConfig, TrainConfig
from ..data.batching import (
    balanced_parts,
    collate,
    collate_packed,
    epoch_batches,
    example_lengths,
    token_budget_batches,
)
from .distributed import PASS_WEIGHT, local_part


@dataclass
class BatchStream:
    examples: list[dict]
    task: str
    pad_id: int
    cfg: TrainConfig
    perf: PerfConfig
    packing: bool
    # (example, epoch, index) -> the example to train on, with `.length(example)` its batching cost; None: as is
    transform: Callable[[dict, int, int], dict] | None = field(default=None, kw_only=True)
    # A distributed run (train/distributed.py): (rank, world). `cfg` then sizes the *global* micro-batches
    # (batch_size x world) and this rank trains on its share of each.
    shard: tuple[int, int] = field(default=(0, 1), kw_only=True)
    lengths: list[int] = field(init=False)
    _cached: tuple[int, list[list[int]]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        t = self.transform
        known = getattr(self.examples, "lengths", None)  # a streamed corpus's blocks (data/blockstore.py)
        if known is not None:  # their lengths, without reading every block back from disk
            self.lengths = [t.length_of(int(n)) if t else int(n) for n in known]
        else:
            self.lengths = [t.length(ex) for ex in self.examples] if t else example_lengths(self.examples)

    def epoch(self, epoch: int) -> list[list[int]]:
        """The micro-batches (example indices) of one epoch, in order."""
        if self._cached is None or self._cached[0] != epoch:
            c = self.cfg
            if c.max_tokens:
                batches = token_budget_batches(self.lengths, c.max_tokens, c.seed, epoch)
            else:
                batches = epoch_batches(self.lengths, c.batch_size, c.seed, epoch, c.group_by_length)
            self._cached = (epoch, batches)
        return self._cached[1]

    def next_batch(self, state) -> list[int]:
        """The micro-batch at `state`'s position (epoch, batch_idx), advancing it."""
        batches = self.epoch(state.epoch)
        while state.batch_idx >= len(batches):
            state.epoch, state.batch_idx = state.epoch + 1, 0
            batches = self.epoch(state.epoch)
        state.batch_idx += 1
        return batches[state.batch_idx - 1]

    def split_by_tokens(self, idx: list[int]) -> list[list[int]]:
        """A batch cut into consecutive parts of at most `micro_batch_tokens` tensor tokens (one example may exceed).

        The parts are accumulated into the same optimizer step with the step's supervised-token count as the
        normaliser, so the gradient is the batch's own; only the activations alive at once shrink. Balanced
        (see `balanced_parts`): the largest pass sets the peak memory.
        """
        cap = self.perf.micro_batch_tokens
        return balanced_parts(idx, self.lengths, cap, self.packing) if cap else [idx]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Packed (one row, no pad) or padded, per the resolved `packing`."""
        return (
            collate_packed(examples, self.task) if self.packing else collate(examples, self.pad_id, self.task)
        )

    def next_step(self, state, grad_accum: int) -> list[dict[str, torch.Tensor]]:
        """The collated passes of one optimizer step: `grad_accum` micro-batches, each cut by the token cap."""
        passes = []
        for _ in range(grad_accum):
            batch = self.next_batch(state)  # state.epoch is now the batch's epoch
            if self.shard[1] > 1:
                mine = local_part(batch, *self.shard)
                if (
                    not mine
                ):  # fewer examples than processes: a stand-in pass of weight 0 joins the all-reduce
                    stand_in = self.collate([self.example(batch[0], state.epoch)])
                    passes.append({**stand_in, PASS_WEIGHT: torch.zeros(())})
                    continue
                batch = mine
            for part in self.split_by_tokens(batch):
                passes.append(self.collate([self.example(i, state.epoch) for i in part]))
        return passes

    def example(self, index: int, epoch: int) -> dict:
        """Example `index` as epoch `epoch` trains on it (the transform's rewrite, if any)."""
        ex = self.examples[index]
        return self.transform(ex, epoch, index) if self.transform is not None else ex
