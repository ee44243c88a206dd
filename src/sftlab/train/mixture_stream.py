"""The sampler of a multi-task run: `BatchStream`'s interface over a task mixture (`data/mixture.py`).

A mixture epoch's draws (a pure function of (seed, epoch)) are shuffled and cut into micro-batches by the same
batchers as a one-task run (length grouping, token budgets), so the loop state's (epoch, batch index) is the
whole sampler state: checkpoints and Ctrl-C rewinds need nothing more, and resume is bit-identical. Batches carry
`task_ids` (each row's task, or each token's in a packed row), which the objective reads for the per-task loss
weights and drops before the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.batching import epoch_batches, token_budget_batches
from ..data.mixture import Mixture
from ..data.tasks import task_ids
from .stream import BatchStream


@dataclass
class MixtureStream(BatchStream):
    mixture: Mixture | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mixture is None or self.mixture.total != len(self.examples):
            raise ValueError("MixtureStream: the mixture must cover the examples (task 0's first, in order)")

    def epoch(self, epoch: int) -> list[list[int]]:
        """The micro-batches (global example indices) of mixture epoch `epoch`, in order."""
        if self._cached is None or self._cached[0] != epoch:
            c = self.cfg
            draws = self.mixture.epoch_draws(c.seed, epoch)
            lengths = [self.lengths[i] for i in draws]
            if c.max_tokens:
                local = token_budget_batches(lengths, c.max_tokens, c.seed, epoch)
            else:
                local = epoch_batches(lengths, c.batch_size, c.seed, epoch, c.group_by_length)
            self._cached = (epoch, [[draws[j] for j in b] for b in local])
        return self._cached[1]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        batch["task_ids"] = task_ids(examples, self.packing)  # (B,) padded, (1, N) packed
        return batch


def make_stream(
    examples,
    task,
    pad_id,
    cfg,
    perf,
    packing,
    mixture: Mixture | None = None,
    transform=None,
    shard: tuple[int, int] = (0, 1),
) -> BatchStream:
    """The run's sampler: the one-task stream (each example rewritten by `transform` if given: a self-supervised
    objective's corruption), or the mixture's when `data.tasks` made one. `shard` (rank, world): this process's
    share of each global micro-batch, which `cfg` sizes (train/distributed.py)."""
    if mixture is None:
        return BatchStream(examples, task, pad_id, cfg, perf, packing, transform=transform, shard=shard)
    return MixtureStream(examples, task, pad_id, cfg, perf, packing, mixture=mixture, shard=shard)
