"""What the loop does around its steps, as small callbacks: metrics and progress, evaluation with early
stopping, checkpoints. The loop calls them in order; each reads and writes only the trainer's public state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .metrics import plot_loss
from .progress import Progress

if TYPE_CHECKING:
    from .loop import StepResult, Trainer


class Callback:
    """No-op hooks; a callback overrides the ones it needs."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

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
            trainer.total_steps, enabled=self.show_progress, log_every=self.log_every, clock=self.clock
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
        if trainer.metrics.path.exists():
            plot_loss(trainer.metrics.path, trainer.run_dir / "loss.png")


@dataclass
class EvalCallback(Callback):
    """Held-out loss every `every` steps and at the end; asks the loop to stop after `patience` evals without a
    new best."""

    every: int | None
    patience: int | None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        step = trainer.state.step
        if self.every and step % self.every == 0 and step < trainer.total_steps and self._eval(trainer):
            trainer.log(f"early stopping at step {step}: no eval improvement in {self.patience} evals")
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer) -> None:
        self._eval(trainer)

    def _eval(self, trainer: Trainer) -> bool:
        """Evaluate and record; True when patience ran out."""
        res = trainer.run_eval()
        if not res:
            return False
        s = trainer.state
        s.last_eval = res
        trainer.metrics.write({"step": s.step, **res})
        trainer.log(f"step {s.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
        if s.best_eval is None or res["eval_loss"] < s.best_eval:
            s.best_eval, s.bad_evals = res["eval_loss"], 0
            return False
        s.bad_evals += 1
        return bool(self.patience and s.bad_evals >= self.patience)


@dataclass
class CheckpointCallback(Callback):
    """A checkpoint every `every` steps, and one at an interrupt (the loop has rewound to the step's start)."""

    every: int | None

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.every and trainer.state.step % self.every == 0:
            trainer.save()

    def on_interrupt(self, trainer: Trainer) -> None:
        path = trainer.save()
        trainer.log(
            f"interrupted: checkpoint saved to {path}; continue with `sftlab train <config> --resume`"
        )
