"""Per-task evaluation of a multi-task run: each task's eval set on its own, its loss and its metric.

At every eval the joined eval examples are grouped by their task (`TASK_KEY`) and each group goes through the same
`eval_loss` as a one-task run, so a task's row is exactly what evaluating its examples alone gives. The overall
row (what early stopping reads, and what one-task runs log) is the token-weighted mean of the tasks' losses: the
loss over all tasks' eval sets together, with the same keys as before.

A task's metric:
- seq-cls (a head per task): accuracy, from the objective, over all its eval examples;
- a classification task trained as text (causal-lm, seq2seq): accuracy = the greedy answer is the label's name;
- a text task with `metric: exact|f1`: exact match and token F1 (scores.py, SQuAD's) of the greedy answer against
  the reference answer, both logged.
Generated metrics score the task's first `train.eval_generate_limit` eval examples: a causal example's prompt is
everything before its last supervised span (the last answer, earlier turns kept as context), the reference that
span; a seq2seq example's prompt is its source, the reference its target. Answers are cut at EOS and end-of-turn
markers. At most the longest reference (in tokens) plus a few tokens are generated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.batching import IGNORE
from ..data.tasks import TASK_KEY, TEXT_TASKS
from ..generate import Answers, generate_ids
from ..scores import exact_match, label_match, mean, token_f1
from .distributed import Dist, gather_objects, gathered
from .eval_loss import eval_loss
from .objective import Objective

EXTRA_NEW_TOKENS = 8  # generated beyond the longest reference: room to be wrong in length, not to ramble


@dataclass(frozen=True)
class TaskSpec:
    """How one task is evaluated: its headline metric and whether that needs generated answers."""

    name: str
    metric: str | None = None  # accuracy | exact | f1 | None (loss only)
    generate: bool = False  # classification as text, exact, f1: greedy answers

    @property
    def keys(self) -> tuple[str, ...]:
        """The row keys of its metric."""
        if self.metric == "accuracy":
            return ("eval_accuracy",)
        return ("eval_exact", "eval_f1") if self.metric else ()


def task_specs(data_cfg: Any, model_task: str) -> list[TaskSpec]:
    """Each task of `data.tasks`: classification -> accuracy (generated when trained as text); else its metric."""
    out = []
    for t in data_cfg.tasks:
        if t.format == "classification":
            out.append(TaskSpec(t.name, "accuracy", model_task in TEXT_TASKS))
        else:
            out.append(TaskSpec(t.name, t.metric, t.metric is not None))
    return out


@dataclass
class TaskEval:
    """Evaluates each task's eval examples alone (see the module docstring). `route(task index, rows)` is a context
    each generated batch of `rows` prompts runs in, for methods whose tasks have their own modules (per-task heads
    or adapters: every row through that task's); default: none. The loss side routes by the batches' task_ids."""

    tasks: list[TaskSpec]
    tokenizer: Any = None  # needed when a task generates
    generate_limit: int = 64
    reserved_positions: int = 0  # a prompt/prefix method's virtual tokens (generate.fit_new_tokens)
    route: Callable[[int, int], contextlib.AbstractContextManager] | None = None
    _answers: Answers | None = field(default=None, repr=False)

    def evaluate(
        self, objective: Objective, examples: list[dict], batch_size: int, pad_id: int, d: Dist | None = None
    ) -> tuple[dict, list[dict]]:
        """(the overall row, one row per task that has eval examples). `d`: a distributed run's place; each rank
        evaluates its share and every rank returns the one-process rows (eval_loss.py, `_generated`)."""
        groups: list[list[dict]] = [[] for _ in self.tasks]
        for ex in examples:
            groups[ex[TASK_KEY]].append(ex)
        rows, total, tokens, correct, n_cls = [], 0.0, 0, 0.0, 0
        for i, (spec, exs) in enumerate(zip(self.tasks, groups)):
            if not exs:
                continue
            res = eval_loss(objective, exs, batch_size, pad_id, d)
            row = {"task": spec.name, **res, "eval_examples": len(exs)}
            total += res["eval_loss"] * res["eval_tokens"]
            tokens += res["eval_tokens"]
            if "eval_accuracy" in res:  # seq-cls: over every eval example
                correct += res["eval_accuracy"] * len(exs)
                n_cls += len(exs)
            if spec.generate and self.generate_limit:
                row.update(self._generated(objective, i, spec, exs[: self.generate_limit], batch_size, d))
            rows.append(row)
        overall = {"eval_loss": total / max(1, tokens), "eval_tokens": tokens}
        if objective.task == "seq-cls":
            overall["eval_accuracy"] = correct / max(1, n_cls)
        else:
            overall["eval_perplexity"] = math.exp(min(overall["eval_loss"], 50.0))
        return overall, rows

    # -- generated answers ------------------------------------------------------------------------------------
    def _generated(
        self,
        objective: Objective,
        index: int,
        spec: TaskSpec,
        exs: list[dict],
        batch_size: int,
        d: Dist | None = None,
    ) -> dict:
        """The task's generated metric. Distributed under DDP: the one-process generation batches are dealt
        round-robin over the ranks (each batch whole, so its greedy answers are the one-process ones) and every rank
        gathers all the per-example scores, averaged in the one-process order (the same floats). Under FSDP every
        rank generates them all: each decoding step is a collective there, and how many a batch takes depends on
        when its answers end, so the ranks cannot each decode their own batches."""
        pairs = [p for p in (prompt_and_reference(ex, objective.task) for ex in exs) if p is not None]
        if not pairs:
            return {"eval_generated": 0}
        prompts, refs = [p for p, _ in pairs], [r for _, r in pairs]
        max_new = max(len(r) for r in refs) + EXTRA_NEW_TOKENS
        fsdp = d is not None and d.active and d.kind == "fsdp"
        shard = d if d is not None and d.active and not fsdp else None
        starts = list(range(0, len(prompts), batch_size))
        was_training = objective.training
        scores: dict[int, tuple[float, ...]] = {}  # example index -> its score(s)
        # FSDP: generation runs objective.model, not the root's forward, so the root's own parameters (embeddings,
        # norm, head) are gathered around it, and every rank decodes until all are done (steps are collectives)
        synced = {"synced": True} if fsdp else {}
        try:
            with gathered(objective) if fsdp else contextlib.nullcontext():
                for start in starts[shard.rank :: shard.world] if shard else starts:
                    chunk = prompts[start : start + batch_size]
                    with self.route(index, len(chunk)) if self.route else contextlib.nullcontext():
                        new = generate_ids(
                            objective.model,
                            self.tokenizer,
                            chunk,
                            max_new_tokens=max_new,
                            batch_size=batch_size,
                            reserved_positions=self.reserved_positions,
                            **synced,
                        )
                    for j, ids in enumerate(new):
                        a, r = self.answer(ids), self.answer(refs[start + j])
                        if spec.metric == "accuracy":
                            scores[start + j] = (label_match(a, r),)
                        else:
                            scores[start + j] = (exact_match(a, r), token_f1(a, r))
        finally:
            objective.train(was_training)
        if shard:
            scores = {i: v for part in gather_objects(scores, shard) for i, v in part.items()}
        ordered = [scores[i] for i in range(len(pairs))]
        out: dict[str, Any] = {}
        if spec.metric == "accuracy":
            out["eval_accuracy"] = mean([s[0] for s in ordered])
        else:
            out["eval_exact"] = mean([s[0] for s in ordered])
            out["eval_f1"] = mean([s[1] for s in ordered])
        out["eval_generated"] = len(pairs)
        return out

    def answer(self, ids: list[int]) -> str:
        """The text of an answer: ids up to the first EOS / end-of-turn token, decoded, cut at an end-of-turn
        marker written as plain text (a template whose marker is not one token), stripped."""
        if self._answers is None:
            self._answers = Answers(self.tokenizer)
        return self._answers.text(ids)


def prompt_and_reference(example: dict, task: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference answer ids) of an encoded example; None when it has no prompt to answer."""
    ids, labels = example["input_ids"], example["labels"]
    if task == "seq2seq":
        return list(ids), [t for t in labels if t != IGNORE]
    if task != "causal-lm":
        return None
    end = max((j for j, v in enumerate(labels) if v != IGNORE), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    if start == 0:  # supervised from the first token (format text): nothing to prompt with
        return None
    return list(ids[:start]), list(ids[start : end + 1])


# -- the summary table and tasks.png ------------------------------------------------------------------------------


def summary_rows(specs: list[TaskSpec], last: list[dict], best: list[dict]) -> dict[str, dict]:
    """Per task name: its metric, eval examples, and its row at the last eval and at the best (lowest overall
    eval loss) one, each with the step it was measured at."""
    out: dict[str, dict] = {}
    for spec in specs:
        entry: dict[str, Any] = {"metric": spec.metric}
        for key, rows in (("eval", last), ("best_eval", best)):
            row = next((r for r in rows if r.get("task") == spec.name), None)
            if row is not None:
                entry.setdefault("eval_examples", row.get("eval_examples"))
                entry[key] = {k: v for k, v in row.items() if k not in ("task", "eval_examples")}
        out[spec.name] = entry
    return out


def headline(row: dict, metric: str | None) -> float | None:
    """The value a task's metric curve shows: accuracy, exact match or token F1, per the task's metric."""
    key = {"accuracy": "eval_accuracy", "exact": "eval_exact", "f1": "eval_f1"}.get(metric or "")
    return row.get(key) if key else None


def plot_tasks(rows: list[dict], specs: list[TaskSpec], out_png: Path) -> None:
    """tasks.png: each task's eval loss over steps and, where it has one, its metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = {s.name: s.metric for s in specs}
    per_task: dict[str, list[dict]] = {}
    for r in rows:
        if "task" in r and "eval_loss" in r:
            per_task.setdefault(r["task"], []).append(r)
    if not per_task:
        return
    curves = {
        name: [
            (r["step"], headline(r, metric.get(name)))
            for r in rs
            if headline(r, metric.get(name)) is not None
        ]
        for name, rs in per_task.items()
    }
    with_metric = any(curves.values())
    fig, axes = plt.subplots(1, 2 if with_metric else 1, figsize=(11 if with_metric else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    for name, rs in per_task.items():
        loss_ax.plot([r["step"] for r in rs], [r["eval_loss"] for r in rs], "o-", label=name)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("eval loss (nats/token)")
    loss_ax.set_title("eval loss per task")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    if with_metric:
        ax = axes[0][1]
        for name, points in curves.items():
            if points:
                ax.plot(*zip(*points), "o-", label=f"{name} ({metric[name]})")
        ax.set_xlabel("step")
        ax.set_ylabel("metric")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("metric per task")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
