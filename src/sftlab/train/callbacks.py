"""What the loop does around its steps, as small callbacks: metrics and progress, evaluation with early
stopping, checkpoints. The loop calls them in order; each reads and writes only the trainer's public state."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..threads import LoadWatch
from .conflict import conflict_row, plot_conflict, probe_indices, probe_passes
from .metrics import MetricsLog, plot_loss
from .progress import Progress
from .task_eval import plot_tasks

if TYPE_CHECKING:
    from .loop import StepResult, Trainer


class Callback:
    """No-op hooks; a callback overrides the ones it needs."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_gradients(self, trainer: Trainer, passes: list[dict]) -> None:
        """The step's gradients are accumulated in .grad, before clipping and the update (state.step is the
        previous step); `passes` are its collated micro-batches. Must not change .grad, the weights or the RNG."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None:
        """The run completed its steps (not early-stopped, interrupted or diverged)."""

    def on_interrupt(self, trainer: Trainer) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None:
        """Always, last: error or not."""


@dataclass
class MetricsCallback(Callback):
    """A metrics.jsonl row every `log_every` steps (and the last), progress (a bar on a terminal, plain lines
    otherwise: progress.py), loss.png at the end."""

    log_every: int
    show_progress: bool = True
    clock: Callable[[], float] = time.monotonic  # for the plain lines' 30 s rule; tests pass a fake

    def on_fit_start(self, trainer: Trainer) -> None:
        self.progress = Progress(
            trainer.total_steps,
            enabled=self.show_progress and trainer.dist.main,  # distributed: rank 0 shows it
            log_every=self.log_every,
            clock=self.clock,
        )
        self.progress.start(trainer.state.step)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        s = trainer.state
        if s.step % self.log_every == 0 or s.step == trainer.total_steps:
            trainer.metrics.write(
                {
                    "step": s.step,
                    "loss": result.loss,
                    "lr": result.lr,
                    "tokens_per_s": result.tokens_per_s,
                    "grad_norm": result.grad_norm,
                    "epoch": s.epoch + s.batch_idx / max(1, trainer.batches_per_epoch),
                }
            )
        self.progress.update(s.step, loss=result.loss, lr=result.lr, tokens=s.tokens, seconds=s.train_time)

    def on_fit_end(self, trainer: Trainer) -> None:
        if hasattr(self, "progress"):
            self.progress.stop()
        if trainer.dist.main and trainer.metrics.path.exists():
            plot_loss(trainer.metrics.path, trainer.run_dir / "loss.png")


@dataclass
class FlatLossCallback(Callback):
    """Warns (log, metrics.jsonl, summary) when the training loss has not moved for `steps` steps: on different
    batches that means the model's output no longer depends on its input, as after an extreme learning rate
    (lr 1e6 sends tiny-llama to the uniform distribution, loss = ln(vocab) on every batch)."""

    steps: int = 10
    rel_tol: float = 1e-5

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        s, loss = trainer.state, result.loss
        if result.supervised == 0 or not math.isfinite(loss):
            return
        if s.flat_loss is None or abs(loss - s.flat_loss) > self.rel_tol * abs(s.flat_loss):
            s.flat_loss, s.flat_since = loss, s.step
            return
        if s.flat_since is not None and s.step - s.flat_since + 1 == self.steps:
            msg = (
                f"the loss has not moved for {self.steps} steps ({s.flat_loss:.6g} since step {s.flat_since}, "
                f"lr {result.lr:g}): the model has likely collapsed"
                + ("; try a lower train.lr" if result.lr >= 1e-2 else "")
            )
            s.warnings.append(msg)
            trainer.metrics.write({"step": s.step, "warning": msg})
            trainer.log(f"warning: {msg}")


@dataclass
class ThreadsCallback(Callback):
    """With `train.threads` unset, follows the machine's load (sftlab/threads.py): fewer torch threads as soon as
    other processes take cores, more once two checks agree they are free again. A set count is left alone."""

    threads: int | None
    watch_factory: Callable[[int], LoadWatch] = LoadWatch  # tests pass a fake machine

    def on_fit_start(self, trainer: Trainer) -> None:
        self.watch = self.watch_factory(torch.get_num_threads()) if self.threads is None else None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        change = self.watch.check() if self.watch is not None else None
        if change is not None:
            n, others = change
            trainer.log(
                f"threads: {torch.get_num_threads()} -> {n} (other processes used {others:.1f} CPUs of "
                f"{len(self.watch.usable)} over the last {self.watch.every_s:g} s)"
            )
            torch.set_num_threads(n)


@dataclass
class EvalCallback(Callback):
    """Held-out loss every `every` steps and at the last step; asks the loop to stop after `patience` evals without
    a new best. The last step's eval runs before its checkpoint is written, so a run resumed from that checkpoint
    does not evaluate (and log) the same step twice.

    A multi-task run also logs one row per task after the overall row (`task`: its name; train/task_eval.py) and
    draws tasks.png at the end; the best eval, and early stopping, key on the overall eval loss."""

    every: int | None
    patience: int | None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        step = trainer.state.step
        if step >= trainer.total_steps:
            self._eval(trainer)  # the final eval; patience no longer matters
        elif self.every and step % self.every == 0 and self._eval(trainer):
            trainer.log(f"early stopping at step {step}: no eval improvement in {self.patience} evals")
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer) -> None:
        s = trainer.state
        if s.eval_step == s.step:
            return
        # A checkpoint written between the last step and its eval (Ctrl-C), or by an sftlab that evaluated after the
        # final checkpoint: reuse the eval row metrics.jsonl already holds for this step rather than add another.
        rows = [
            r for r in MetricsLog.read(trainer.metrics.path) if r.get("step") == s.step and "eval_loss" in r
        ]
        logged = [r for r in rows if "task" not in r]
        if logged:
            s.last_eval = {k: v for k, v in logged[-1].items() if k != "step"}
            s.task_eval = [r for r in rows if "task" in r]
            s.eval_step = s.step
        else:
            self._eval(trainer)

    def _eval(self, trainer: Trainer) -> bool:
        """Evaluate and record; True when patience ran out."""
        res, task_rows = trainer.evaluate()
        if not res:
            return False
        s = trainer.state
        s.last_eval, s.eval_step = res, s.step
        s.task_eval = [{"step": s.step, **r} for r in task_rows]
        trainer.metrics.write({"step": s.step, **res})
        for row in s.task_eval:
            trainer.metrics.write(row)
        trainer.log(f"step {s.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
        for row in task_rows:
            trainer.log(
                f"  task {row['task']}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "task")
            )
        if s.best_eval is None or res["eval_loss"] < s.best_eval:
            s.best_eval, s.bad_evals = res["eval_loss"], 0
            s.best_task_eval = s.task_eval
            return False
        s.bad_evals += 1
        return bool(self.patience and s.bad_evals >= self.patience)

    def on_fit_end(self, trainer: Trainer) -> None:
        path = trainer.metrics.path if hasattr(trainer, "metrics") and trainer.dist.main else None
        if trainer.task_eval is not None and path is not None and path.exists():
            rows = MetricsLog.read(path)
            if any("task" in r and "eval_loss" in r for r in rows):
                plot_tasks(rows, trainer.task_eval.tasks, trainer.run_dir / "tasks.png")


@dataclass
class TaskConflictCallback(Callback):
    """Every `every` steps of a multi-task run, the cosines of the tasks' gradients, each on a probe batch of its own
    training examples (train/conflict.py), at the weights before the step's update, as a metrics.jsonl row
    `{"step", "tasks", "task_grad_cosine", "task_grad_norm"}`; task_conflict.png at the end. Training is unchanged."""

    every: int
    _row: dict | None = None

    def on_gradients(self, trainer: Trainer, passes: list[dict]) -> None:
        self._row = None
        m, step = trainer.mixture, trainer.state.step + 1
        if m is None or step % self.every:
            return
        c = trainer.cfg
        probes = [
            probe_passes(trainer.stream, probe_indices(m, k, c.batch_size, c.seed, step))
            for k in range(len(m.names))
        ]
        self._row = conflict_row(trainer.objective, probes, trainer.trainable_parameters(), m.names)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self._row is not None:
            trainer.metrics.write({"step": trainer.state.step, **self._row})
            self._row = None

    def on_fit_end(self, trainer: Trainer) -> None:
        path = trainer.metrics.path if hasattr(trainer, "metrics") and trainer.dist.main else None
        if path is not None and path.exists():
            plot_conflict(MetricsLog.read(path), trainer.run_dir / "task_conflict.png")


@dataclass
class CheckpointCallback(Callback):
    """A checkpoint every `every` steps, and one at an interrupt (the loop has rewound to the step's start) unless
    that state is already on disk."""

    every: int | None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.every and trainer.state.step % self.every == 0:
            trainer.save()

    def on_interrupt(self, trainer: Trainer) -> None:
        step = trainer.state.step
        if trainer.save_abandoned:
            trainer.log(f"interrupted: checkpoint step-{step} abandoned; --resume starts from the one before")
            return
        if trainer.saved_step == step:
            path = trainer.ckpt_root / f"step-{step}"
        else:
            path = trainer.save(interrupting=True)
            if path is None:  # weights not finite: nothing written (the trainer said so)
                return
        trainer.log(
            f"interrupted: checkpoint saved to {path}; continue with `sftlab train <config> --resume`"
        )
