"""Task mixtures: how often each task is sampled (the rates), and which examples each mixture epoch draws.

Rates, over tasks i with n_i training examples (`mixture_rates`):
- proportional: r_i ∝ min(n_i, K), K = `cap` (none: r_i ∝ n_i). T5's examples-proportional mixing: the cap keeps
  one huge task from crowding out the others.
- temperature: r_i ∝ min(n_i, K)^(1/T). T = 1 is proportional; T -> ∞ tends to equal; T > 1 flattens the mixture
  toward small tasks (T5 section 3.5.2, mT5's language sampling).
- equal: r_i = 1/k for k tasks.
- weights: r_i ∝ w_i, each task's `weight`.

Sampling is per example, stratified, and a pure function of (seed, epoch), so a run's position (epoch, batch index
in the loop state) is all a checkpoint needs to resume it bit-identically. A mixture epoch draws N = sum n_i
examples (the size of all tasks together, so `train.epochs` keeps its meaning: one epoch of a proportional mixture
is one pass over every task). Task i's draws in epoch e are counted by cumulative rounding, P_i(e) =
floor(e * N * r_i + 1/2) draws before epoch e, so the shares are exact over a run (never off by more than one
example per task) and a task's fractional share carries over instead of rounding to zero each epoch. Within a task,
draw number k is example perm_i(k // n_i)[k % n_i]: a seeded permutation per pass over the task, so every example
is seen once before any is seen twice. The epoch's draws are then shuffled and cut into micro-batches by the
single-task batchers (`batching.py`, length grouping and token budgets included), so the rows of one micro-batch
come from any tasks: the mixing is per example, as in T5, which per-row routing (per-task heads or adapters) needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("proportional", "temperature", "equal", "weights")
_TAG = 0x3A7  # keeps the mixture's random streams apart from the batch order's (batching._rng)


def mixture_rates(
    sizes: Sequence[int],
    strategy: str = "proportional",
    cap: int | None = None,
    temperature: float | None = None,
    weights: Sequence[float] | None = None,
) -> list[float]:
    """Sampling rate of each task (summing to 1), per the formulas in the module docstring."""
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"every task needs at least one example (sizes {list(sizes)})")
    capped = [float(min(n, cap)) if cap else float(n) for n in sizes]
    if strategy == "proportional":
        mass = capped
    elif strategy == "temperature":
        if not temperature or temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {temperature})")
        mass = [m ** (1.0 / temperature) for m in capped]
    elif strategy == "equal":
        mass = [1.0] * len(sizes)
    elif strategy == "weights":
        if weights is None or len(weights) != len(sizes) or any(not w > 0 for w in weights):
            raise ValueError(f"weights: expected one positive weight per task (got {weights})")
        mass = [float(w) for w in weights]
    else:
        raise ValueError(f"mixing strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    total = sum(mass)
    return [m / total for m in mass]


@dataclass(frozen=True)
class Mixture:
    """The tasks of a run as the sampler sees them: their sizes and rates, in the order of `data.tasks`.

    The train examples of all tasks sit in one list, task 0's first: task i owns indices offsets[i] ..
    offsets[i] + sizes[i] - 1. `loss_weights` scale each task's token losses in the objective.
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    rates: tuple[float, ...]
    loss_weights: tuple[float, ...]
    strategy: str = "proportional"

    @property
    def offsets(self) -> list[int]:
        return [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @property
    def total(self) -> int:
        """Draws per mixture epoch: all tasks' examples together."""
        return sum(self.sizes)

    def draws_before(self, epoch: int) -> list[int]:
        """P_i(epoch): how many examples of each task the epochs before `epoch` drew (cumulative rounding)."""
        return [int(np.floor(epoch * self.total * r + 0.5)) for r in self.rates]

    def epoch_counts(self, epoch: int) -> list[int]:
        """Draws of each task in mixture epoch `epoch`."""
        return [b - a for a, b in zip(self.draws_before(epoch), self.draws_before(epoch + 1))]

    def epoch_draws(self, seed: int, epoch: int) -> list[int]:
        """The (global) example indices mixture epoch `epoch` draws, grouped by task; the batcher shuffles them."""
        out: list[int] = []
        for i, (start, stop) in enumerate(zip(self.draws_before(epoch), self.draws_before(epoch + 1))):
            n, base = self.sizes[i], self.offsets[i]
            for t in range(start // n, (stop - 1) // n + 1 if stop > start else start // n):
                perm = _task_order(seed, i, t, n)
                lo, hi = max(start, t * n) - t * n, min(stop, (t + 1) * n) - t * n
                out += (perm[lo:hi] + base).tolist()
        return out

    def describe(self, epochs: float, supervised: Sequence[int] | None = None) -> list[dict]:
        """Per task, for a run of `epochs` mixture epochs: examples, rate, expected draws and passes over the task,
        and (given each task's supervised tokens) its expected share of the supervised tokens the loss averages."""
        draws = [epochs * self.total * r for r in self.rates]
        per_ex = [s / n for s, n in zip(supervised, self.sizes)] if supervised else None
        tok = [d * p for d, p in zip(draws, per_ex)] if per_ex else None
        rows = []
        for i, name in enumerate(self.names):
            row = {
                "task": name,
                "examples": self.sizes[i],
                "rate": self.rates[i],
                "draws": draws[i],
                "epochs": draws[i] / self.sizes[i],
                "loss_weight": self.loss_weights[i],
            }
            if tok:
                row["token_share"] = tok[i] / sum(tok) if sum(tok) else 0.0
            rows.append(row)
        return rows


def _task_order(seed: int, task: int, task_epoch: int, n: int) -> np.ndarray:
    """The order of task `task`'s n examples in its pass number `task_epoch` (seeded, independent per pass)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, task, task_epoch & 0xFFFFFFFF, _TAG])
    return rng.permutation(n)


def mixture_table(mixture: Mixture, epochs: float, supervised: Sequence[int] | None = None) -> str:
    """The mixture as `sftlab train` prints it before training."""
    rows = mixture.describe(epochs, supervised)
    width = max(4, *(len(r["task"]) for r in rows))
    head = f"  {'task':<{width}}  {'examples':>9}  {'share':>6}  {'draws':>9}  {'epochs':>7}  {'loss_w':>6}"
    has_tok = "token_share" in rows[0]
    lines = [
        f"mixture ({mixture.strategy}, {epochs:.3g} mixture epochs of {mixture.total} examples):",
        head + ("  tokens" if has_tok else ""),
    ]
    for r in rows:
        line = (
            f"  {r['task']:<{width}}  {r['examples']:>9}  {100 * r['rate']:>5.1f}%  {r['draws']:>9.0f}  "
            f"{r['epochs']:>7.2f}  {r['loss_weight']:>6g}"
        )
        lines.append(line + (f"  {100 * r['token_share']:>5.1f}%" if has_tok else ""))
    return "\n".join(lines)
