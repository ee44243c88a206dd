"""Gradient conflict between the tasks of a multi-task run: per-task gradients, their cosines, PCGrad.

The diagnostic (`train.task_grad_cosine_every`): on a diagnostic step, each task's gradient is that of its mean
token loss (its loss weight aside: a cosine ignores scale) on a probe batch of `train.batch_size` of its own training
examples, drawn afresh by (seed, step, task) with numpy's generator, so no training draw moves; the weights are the
ones the step's update is about to change. Probes rather than the step's own batch: length-grouped batches
(`train.group_by_length`) of tasks whose examples differ in length mostly hold one task, which would leave most
steps with nothing to compare; with probes every row compares every task. The pairwise cosines over the *shared*
trainable parameters (those every task's loss reaches; a task's own head or adapter cannot conflict with another task,
and counting it would only shrink every cosine towards 0) show which tasks pull against each other: near 1, the tasks
agree; near 0, they touch unrelated directions; below 0, a step for one undoes some of the other's. With per-task
adapters and heads nothing is shared: the cosines are null. The norms are of each task's whole gradient. It costs a forward and backward per task on those steps (and a copy of the trainable gradients per task),
and never changes training: the gradients come from `torch.autograd.grad` (the parameters' `.grad` is untouched)
under a forked RNG (dropout masks drawn there are not drawn from the training stream).

PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"; `train.task_balancing: pcgrad`) works on the
step's own micro-batches: a task's gradient there is its part of the step's gradient, the gradient of (its targets'
loss sum, with its loss weight) / (all the step's supervised targets), split by each row's task (each token's in a
packed row), so the parts add up to the step's gradient. Each part g_i is projected off every other part g_j it
conflicts with (g_i . g_j < 0: g_i -= (g_i . g_j) / |g_j|^2 g_j, the g_j in a random order seeded by (seed, step)),
and the step follows the sum. Without conflicts it is the plain step's gradient; a step that holds one task only is
left as it is, so PCGrad needs steps that mix tasks (`pcgrad_note` says when few do).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.batching import IGNORE
from ..data.mixture import Mixture
from ..data.tasks import TASK_KEY
from .objective import Objective, count_supervised
from .stream import BatchStream

Grads = list[
    torch.Tensor | None
]  # one entry per trainable parameter; None: the task's loss does not reach it
_TAG = 0x9C6  # keeps PCGrad's order stream apart from the data order's


def split_by_task(batch: dict[str, torch.Tensor], task: str) -> dict[int, dict[str, torch.Tensor]]:
    """Each task's part of a micro-batch: its rows (a padded batch, task_ids (B,)); or, for a packed row
    (task_ids (1, N)), the whole row with the other tasks' targets ignored (attention stays per example)."""
    ids = batch["task_ids"]
    parts = {}
    for k in sorted(set(ids.flatten().tolist())):
        if ids.dim() == 1:  # (B,): rows
            rows = ids == k
            parts[k] = {
                name: v[rows] if v.dim() and v.shape[0] == ids.shape[0] else v for name, v in batch.items()
            }
        else:  # (1, N): tokens of a packed causal-LM row
            parts[k] = {**batch, "labels": batch["labels"].masked_fill(ids != k, IGNORE)}
    return parts


@contextlib.contextmanager
def _rng_forked(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Random draws inside (dropout) leave the training stream's RNG (CPU and the params' GPUs) as it was."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def task_gradients(
    objective: Objective,
    passes: list[dict[str, torch.Tensor]],
    params: Sequence[torch.Tensor],
    keep_rng: bool = True,
) -> tuple[dict[int, Grads], float]:
    """({task index: its part of the step's gradient}, the step's loss sum over its supervised targets).

    Tasks with no supervised target in the step are absent. keep_rng: the training RNG is left as it was (the
    diagnostic); False when these gradients are the step's own (PCGrad)."""
    n_total = sum(count_supervised(b, objective.task) for b in passes)
    grads: dict[int, Grads] = {}
    loss_sum = 0.0
    if n_total == 0:
        return grads, loss_sum
    with _rng_forked(params) if keep_rng else contextlib.nullcontext():
        for batch in passes:
            for k, part in split_by_task(batch, objective.task).items():
                if count_supervised(part, objective.task) == 0:
                    continue
                loss = objective(part).loss
                loss_sum += float(loss.detach())
                if not loss.requires_grad:  # no trainable parameter reached
                    gs: tuple = (None,) * len(params)
                else:
                    gs = torch.autograd.grad(loss / n_total, params, allow_unused=True)
                acc = grads.setdefault(k, [None] * len(params))
                for i, g in enumerate(gs):
                    if g is not None:
                        acc[i] = g if acc[i] is None else acc[i].add_(g)
    return dict(sorted(grads.items())), loss_sum


def _dot(a: Grads, b: Grads) -> float:
    return sum(
        float(torch.dot(x.flatten().double(), y.flatten().double()))
        for x, y in zip(a, b)
        if x is not None and y is not None
    )


def shared_only(grads: Sequence[Grads]) -> list[Grads]:
    """Each task's gradient restricted to the parameters every task's loss reaches (the others set to None)."""
    shared = [all(g[i] is not None for g in grads) for i in range(len(grads[0]))] if grads else []
    return [[x if keep else None for x, keep in zip(g, shared)] for g in grads]


def cosine_matrix(grads: Sequence[Grads]) -> tuple[list[list[float | None]], list[float]]:
    """(K x K cosines, K norms) of the flattened gradients; a cosine with a zero gradient is None."""
    k = len(grads)
    gram = [[0.0] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            gram[i][j] = gram[j][i] = _dot(grads[i], grads[j])
    norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(k)]
    cos: list[list[float | None]] = [
        [gram[i][j] / (norms[i] * norms[j]) if norms[i] > 0 and norms[j] > 0 else None for j in range(k)]
        for i in range(k)
    ]
    for i in range(k):  # exactly 1 on the diagonal (not 1 +- rounding) where defined
        if cos[i][i] is not None:
            cos[i][i] = 1.0
    return cos, norms


def probe_indices(mixture: Mixture, task: int, size: int, seed: int, step: int) -> list[int]:
    """`size` of task `task`'s training examples (all of them when it has fewer), as indices into the joined train
    examples, drawn without replacement by (seed, step, task): a pure function, no RNG state."""
    n = mixture.sizes[task]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, step, task, _TAG])
    picked = rng.choice(n, size=min(size, n), replace=False)
    return (np.sort(picked) + mixture.offsets[task]).tolist()


def probe_passes(stream: BatchStream, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    """A probe batch collated as training collates (packing, task_ids), cut into passes by the token cap."""
    return [stream.collate([stream.examples[i] for i in part]) for part in stream.split_by_tokens(indices)]


def conflict_row(
    objective: Objective,
    probes: Sequence[list[dict[str, torch.Tensor]]],
    params: Sequence[torch.Tensor],
    names: Sequence[str],
) -> dict:
    """The metrics.jsonl fields of one diagnostic: the tasks, the cosine matrix of their gradients (each on its own
    probe's passes, `probes[k]` holding task k's rows only), and the gradient norms (of each task's mean token loss)."""
    grads: list[Grads] = []
    for k, passes in enumerate(probes):
        g, _ = task_gradients(objective, passes, params)
        grads.append(g.get(k, [None] * len(params)))
    cos, _ = cosine_matrix(shared_only(grads))
    _, norms = cosine_matrix(grads)
    return {"tasks": list(names), "task_grad_cosine": cos, "task_grad_norm": norms}


def pcgrad_note(stream: BatchStream, grad_accum: int) -> str | None:
    """A warning when fewer than half of the first epoch's steps hold two tasks or more: PCGrad leaves a one-task
    step as it is."""
    batches = stream.epoch(0)
    steps = [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
    mixed = sum(len({stream.examples[j][TASK_KEY] for b in s for j in b}) >= 2 for s in steps)
    if mixed * 2 >= len(steps):
        return None
    return (
        f"train.task_balancing: pcgrad projects between the tasks of one step, and only {mixed} of the first epoch's "
        f"{len(steps)} steps hold two tasks or more (the rest train as without it); length-grouped batches of tasks "
        "of different lengths hold mostly one task: set train.group_by_length: false, or raise train.grad_accum"
    )


# -- PCGrad ---------------------------------------------------------------------------------------------------------


def pcgrad(grads: Sequence[Grads], order_seed: Sequence[int]) -> Grads:
    """Sum of the tasks' gradients, each projected off the others it conflicts with (in a random order drawn from
    `order_seed`); the plain sum where no pair conflicts. The inputs are not modified."""
    rng = np.random.default_rng([*order_seed, _TAG])
    k = len(grads)
    sq = [_dot(g, g) for g in grads]
    out: Grads = [None] * (len(grads[0]) if grads else 0)
    for i in range(k):
        g = list(grads[i])
        for j in rng.permutation(k).tolist():
            if j == i or sq[j] == 0:
                continue
            d = _dot(g, grads[j])
            if d < 0:
                g = [None if a is None and b is None else _sub(a, b, d / sq[j]) for a, b in zip(g, grads[j])]
        out = [a if b is None else b.clone() if a is None else a + b for a, b in zip(out, g)]
    return out


def _sub(a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> torch.Tensor:
    """a - scale * b, with None as zeros."""
    if b is None:
        return a
    return -scale * b if a is None else a - scale * b


# -- task_conflict.png ----------------------------------------------------------------------------------------------


def plot_conflict(rows: list[dict], out_png: Path) -> None:
    """task_conflict.png: the last cosine matrix (of a step with two tasks or more) as a heatmap, and the cosine of
    each pair (up to 6 pairs) and their mean over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "task_grad_cosine" in r and len(r["tasks"]) >= 2]
    if not rows:
        return
    fig, (hm, ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    last = rows[-1]
    names, cos = last["tasks"], last["task_grad_cosine"]
    grid = np.array([[np.nan if v is None else v for v in r] for r in cos], dtype=float)
    im = hm.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1)
    hm.set_xticks(range(len(names)), names, rotation=45, ha="right")
    hm.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(grid[i, j]):
                hm.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    hm.set_title(f"task gradient cosine, step {last['step']}")
    fig.colorbar(im, ax=hm, fraction=0.046)
    pairs: dict[tuple[str, str], list[tuple[int, float]]] = {}
    means = []
    for r in rows:
        vals = []
        for i, a in enumerate(r["tasks"]):
            for j in range(i + 1, len(r["tasks"])):
                v = r["task_grad_cosine"][i][j]
                if v is not None:
                    pairs.setdefault((a, r["tasks"][j]), []).append((r["step"], v))
                    vals.append(v)
        if vals:
            means.append((r["step"], sum(vals) / len(vals)))
    if len(pairs) <= 6:
        for (a, b), pts in pairs.items():
            ax.plot(*zip(*pts), ".-", alpha=0.6, label=f"{a} / {b}")
    if means:
        ax.plot(*zip(*means), "k-", lw=2, label="mean off-diagonal")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine")
    ax.set_title("task gradient cosine over training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
