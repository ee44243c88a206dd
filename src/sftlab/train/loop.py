"""The training loop: sampler -> step -> callbacks (metrics, eval, checkpoints), with exact resume.

A step accumulates its passes with per-token normalisation (the gradient of the whole batch), clips, and steps
the optimizer and schedule; a NaN loss, or weights that are not finite when a checkpoint is due, stops the run
and names the newest checkpoint that verifies; Ctrl-C rewinds to the step's start and saves, so resume replays
it. Resume takes the newest checkpoint that verifies (checkpoint.py) and drops the newer ones it passed over.
The loop sees an `Objective` (model + loss in one module, which DDP/FSDP can wrap) and encoded examples; it
knows nothing about which method made the trainable parameters.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ..config import PerfConfig, TrainConfig
from ..data.mixture import Mixture
from ..errors import CheckpointError, ConfigError
from . import patches
from .callbacks import (
    Callback,
    CheckpointCallback,
    EvalCallback,
    FlatLossCallback,
    MetricsCallback,
    TaskConflictCallback,
    ThreadsCallback,
)
from .checkpoint import (
    NonFiniteCheckpoint,
    apply_checkpoint,
    list_checkpoints,
    newest_good,
    remove_partial,
    save_checkpoint,
    sigint_deferred,
    step_of,
)
from .conflict import pcgrad, pcgrad_note, task_gradients
from .device import place
from .distributed import Dist, all_sum, barrier, current, distributed_step, pass_counts, peers, wrap
from .eval_loss import eval_loss
from .interrupt import StepInterrupts
from .metrics import MetricsLog
from .mixture_stream import make_stream
from .objective import Objective
from .optim import build_optimizer, build_scheduler
from .packing import resolve_packing
from .task_eval import TaskEval, TaskSpec
from .trackers import tracking_callbacks


def _quiet(*_args) -> None:
    """The log of ranks other than 0."""


class _ReadMetrics(MetricsLog):
    """metrics.jsonl as ranks other than 0 see it: read, never written."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        pass


def _global_batches(cfg: TrainConfig, world: int) -> TrainConfig:
    """The config the sampler sizes micro-batches by: a distributed run's are global (batch_size x world examples,
    or max_tokens x world), each rank training on its share."""
    if world == 1:
        return cfg
    update = {"batch_size": cfg.batch_size * world}
    if cfg.max_tokens:
        update["max_tokens"] = cfg.max_tokens * world
    return cfg.model_copy(update=update)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message names the newest good checkpoint (or says none is)."""


@dataclass
class LoopState:
    step: int = 0  # completed optimizer steps
    epoch: int = 0  # epoch of the next micro-batch
    batch_idx: int = 0  # index of the next micro-batch within its epoch
    tokens: int = 0  # real (non-pad) tokens trained on
    supervised: int = 0
    train_time: float = 0.0
    best_eval: float | None = None
    bad_evals: int = 0
    last_loss: float | None = None
    last_eval: dict = field(default_factory=dict)
    eval_step: int | None = None  # the step last_eval was measured at
    task_eval: list[dict] = field(default_factory=list)  # data.tasks: each task's row at the last eval
    best_task_eval: list[dict] = field(
        default_factory=list
    )  # ... at the eval with the best overall eval_loss
    flat_since: int | None = None  # first step of the current stretch of unchanged loss (FlatLossCallback)
    flat_loss: float | None = None
    warnings: list[str] = field(default_factory=list)
    status: str = "running"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StepResult(NamedTuple):
    loss: float  # mean per supervised token over the step
    supervised: int
    real_tokens: int  # non-pad tokens
    lr: float  # the rate this step used
    grad_norm: float
    seconds: float
    passes: list[dict[str, torch.Tensor]]  # the collated passes (benchmarks count their tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    conflict = [TaskConflictCallback(cfg.task_grad_cosine_every)] if cfg.task_grad_cosine_every else []
    return [
        MetricsCallback(cfg.log_every, cfg.progress),
        ThreadsCallback(cfg.threads),
        FlatLossCallback(),
        *conflict,
        EvalCallback(cfg.eval_every, cfg.early_stopping_patience),
        CheckpointCallback(cfg.save_every),
        *tracking_callbacks(cfg.report_to),  # last: sees the step's eval rows too
    ]


@dataclass
class Trainer:
    model: nn.Module
    cfg: TrainConfig
    task: str
    train_examples: list[dict]
    pad_id: int
    run_dir: Path
    eval_examples: list[dict] | None = None
    log: Callable[[str], None] = print
    perf: PerfConfig = field(default_factory=PerfConfig)
    callbacks: list[Callback] | None = None  # default: metrics, eval, checkpoints
    state: LoopState = field(default_factory=LoopState)
    # data.tasks: train_examples are the tasks' examples (task 0's first), sampled per the mixture's rates
    mixture: Mixture | None = None
    # data.tasks: how each task's eval set is scored (default: its loss only); see train/task_eval.py
    task_eval: TaskEval | None = None
    # train.objective mlm/span: (example, epoch, index) -> the corrupted example, re-drawn per epoch (data/corpus.py)
    transform: Callable[[dict, int, int], dict] | None = None
    # this process's place in a distributed run (train/distributed.py); None: the process group's, if any
    dist: Dist | None = None

    def __post_init__(self) -> None:
        c = self.cfg
        if self.mixture is not None and self.task_eval is None:
            self.task_eval = TaskEval([TaskSpec(name) for name in self.mixture.names])
        weights = self.mixture.loss_weights if self.mixture else None
        d = self.dist = self.dist or current(c.distributed)
        if not d.main:
            self.log = _quiet  # rank 0 speaks for the run
        if d.active and c.task_balancing is not None:
            raise ConfigError(
                f"train.task_balancing: {c.task_balancing} projects whole per-task gradients, which a distributed run "
                f"({d.world} processes) never holds in one place; drop it or train in one process"
            )
        # train.device / train.precision (train/device.py), before the optimizer sees the parameters
        self.precision, self.perf = place(
            self.model, c.device, c.precision, self.perf, d.local_rank if d.active else None
        )
        self.device = self.precision.device
        self.objective = Objective(self.model, self.task, self.perf, loss_weights=weights)
        self.packing = resolve_packing(
            self.perf.packing, self.task, self.model, self.train_examples, self.log
        )
        self.stream = make_stream(
            self.train_examples,
            self.task,
            self.pad_id,
            _global_batches(c, d.world),
            self.perf,
            self.packing,
            self.mixture,
            self.transform,
            shard=(d.rank, d.world),
        )
        self.batches_per_epoch = len(self.stream.epoch(0))
        # what the steps call: the objective, or DDP around it / the objective sharded by FSDP2 (before the
        # optimizer, which must see FSDP's sharded parameters)
        self.wrapped = wrap(self.objective, d, self.device)
        if c.max_steps:
            self.total_steps = c.max_steps
        else:
            self.total_steps = max(1, math.ceil(c.epochs * self.batches_per_epoch / c.grad_accum))
        self.optimizer = build_optimizer(self.model, c.lr, c.weight_decay, c.betas, self.perf.fused_optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, c.warmup_steps, c.schedule)
        c.warn_long_warmup(self.total_steps)
        if c.task_balancing == "pcgrad" and self.mixture is not None:
            note = pcgrad_note(self.stream, c.grad_accum)
            if note:
                warnings.warn(note, stacklevel=2)
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.callbacks is None:
            self.callbacks = default_callbacks(c)
        self.should_stop = False
        self.stopped_by: str | None = None  # "max_time": train.max_time ended the run before its last step
        self.resumed: bool | None = None  # set by resume(): whether a checkpoint was restored
        self.saved_step: int | None = None  # the step whose state is on disk (saved or resumed from)
        self.save_abandoned = False  # the last save was cut short by a second Ctrl-C
        self._stale: list[Path] = []  # checkpoints newer than the one resumed from (they failed to verify)
        # Ctrl-C held from a step's update to its end; distributed: a stop all ranks agree on (train/interrupt.py)
        self.interrupts = StepInterrupts(distributed=d.active)

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, passes: list[dict]) -> tuple[float, int, int]:
        """Forward/backward over the passes, normalised by the supervised tokens of all of them."""
        if self.dist.active:  # this rank's share of the global step (train/distributed.py)
            return distributed_step(
                self.wrapped,
                passes,
                self.task,
                self.precision,
                self.device,
                self.dist,
                self.interrupts.requested,
            )
        n_total, real = pass_counts(passes, self.task)
        if n_total == 0:
            return 0.0, 0, 0
        if self.cfg.task_balancing == "pcgrad" and self.mixture is not None:
            return self._pcgrad_step(passes) / n_total, n_total, real
        loss_sum = 0.0
        for batch in passes:
            with self.precision.autocast():
                loss = self.objective(batch).loss
            self.precision.backward(loss / n_total)
            loss_sum += float(loss.detach())
        return loss_sum / n_total, n_total, real

    def _pcgrad_step(self, passes: list[dict]) -> float:
        """The step's gradient by PCGrad (train/conflict.py), set as the parameters' grad; returns the loss sum."""
        params = self.trainable_parameters()
        grads, loss_sum = task_gradients(self.objective, passes, params, keep_rng=False)
        if grads:
            combined = pcgrad(list(grads.values()), (self.cfg.seed, self.state.step))
            for p, g in zip(params, combined):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        return loss_sum

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates (clipping and the conflict diagnostic read these)."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_step(self) -> float:
        gnorm = float("nan")
        if self.cfg.max_grad_norm:
            params = self.trainable_parameters()
            self.precision.unscale(self.optimizer)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.precision.step(self.optimizer)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    def step(self) -> StepResult:
        """One optimizer step on the stream's next batch; the state advances only when it completes."""
        t0 = time.perf_counter()
        passes = self.stream.next_step(self.state, self.cfg.grad_accum)
        loss, n_sup, real = self.train_step(passes)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            self.state.status = "diverged"
            raise TrainingDiverged(
                f"loss is {loss} at step {self.state.step + 1}; stopped. {self.good_checkpoint_note()} "
                "Try a lower train.lr."
            )
        t_hooks = time.perf_counter()
        for cb in self.callbacks or []:
            cb.on_gradients(self, passes)
        t0 += time.perf_counter() - t_hooks  # diagnostics are not step time (tokens/s)
        lr = self.scheduler.get_last_lr()[0]
        # from the update on, Ctrl-C waits until the step is counted and its callbacks have run (_loop)
        self.interrupts.hold(self.state.step + 1)
        gnorm = self._optimizer_step()
        dt = time.perf_counter() - t0
        s = self.state
        s.step += 1
        s.tokens += real
        s.supervised += n_sup
        s.train_time += dt
        s.last_loss = loss
        return StepResult(loss, n_sup, real, lr, gnorm, dt, passes)

    # -- checkpoints and eval -------------------------------------------------------------------------
    def save(self, interrupting: bool = False) -> Path | None:
        """Checkpoint the current state. A Ctrl-C during the write lets it finish and then stops the run (unless this
        save is the interrupt's own); weights that are not finite stop it as diverged, writing nothing (the
        interrupt's own save only says so and returns None)."""
        step = self.state.step
        self.save_abandoned = False
        try:
            with sigint_deferred(f"step-{step}") as pressed:
                path = save_checkpoint(
                    self.ckpt_root,
                    step,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    self.checkpoint_state(),
                    self.cfg.keep_last,
                    write=self.dist.main,  # a distributed run: rank 0 writes (FSDP: every rank gathers)
                )
            barrier(self.dist, f"checkpoint step-{step}")  # no rank runs ahead of a checkpoint being written
        except KeyboardInterrupt:  # Ctrl-C pressed twice: the user gave up on this checkpoint
            self.save_abandoned = True
            raise
        except NonFiniteCheckpoint as e:
            self.state.status = "diverged"
            if interrupting:
                self.log(f"interrupted: {e}. {self.good_checkpoint_note()}")
                return None
            raise TrainingDiverged(
                f"{e}; stopped. {self.good_checkpoint_note()} Try a lower train.lr."
            ) from None
        self.saved_step = step
        if pressed() and not interrupting:
            if not self.dist.active:
                raise KeyboardInterrupt
            self.interrupts.request()  # the ranks stop together at the next step (train/interrupt.py)
        return path

    def checkpoint_state(self) -> dict:
        """The loop state a checkpoint stores, with fp16-mixed's gradient-scaler state."""
        scaler = self.precision.state_dict()
        world = {"world_size": self.dist.world} if self.dist.active else {}
        return {**self.state.to_dict(), **({"scaler": scaler} if scaler else {}), **world}

    def good_checkpoint_note(self) -> str:
        """Which checkpoint a diverged run can go back to: the newest that verifies (finite, checksums match)."""
        good, _ = newest_good(self.ckpt_root)
        if good is None:
            return f"No good checkpoint: none in {self.ckpt_root} verifies."
        return f"The newest good checkpoint is {good.path} (step {good.step})."

    def resume(self) -> bool:
        """Restore the newest checkpoint that verifies, saying which newer ones were passed over and why; False when
        there is none at all, CheckpointError when none verifies or it does not fit this model."""
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            self.resumed = False
            return False
        ckpt, rejected = newest_good(self.ckpt_root, self.log)
        if ckpt is None:
            raise CheckpointError(
                f"no checkpoint in {self.ckpt_root} can be resumed from: " + "; ".join(rejected)
            )
        if ckpt.note:
            self.log(f"note: {ckpt.note}")
        raw = apply_checkpoint(ckpt, self.model, self.optimizer, self.scheduler)
        self.precision.load_state_dict(raw.get("scaler"))
        self.resumed = True
        self.saved_step = ckpt.step
        self._stale = [p for p in ckpts if step_of(p) > ckpt.step]
        self.state = LoopState(**{k: raw[k] for k in LoopState().to_dict() if k in raw})
        self.state.status = "running"
        self._check_world(int(raw.get("world_size", 1)))
        newest = "" if not rejected else f" (the newest that verifies; {len(rejected)} newer skipped)"
        self.log(f"resumed from {ckpt.path} (step {self.state.step}, epoch {self.state.epoch}){newest}")
        return True

    def _check_world(self, saved: int) -> None:
        """A checkpoint of another world size resumes with a warning: the weights, optimizer and step carry over, the
        global batch becomes batch_size x grad_accum x the new world size, and the data position moves to the same
        share of the epoch (so about the examples already seen are skipped)."""
        world = self.dist.world
        if saved == world:
            return
        s = self.state
        s.batch_idx = s.batch_idx * saved // world
        msg = (
            f"the checkpoint was written by {saved} process(es), this run has {world}: the global batch changes "
            f"from {self.cfg.batch_size * self.cfg.grad_accum * saved} to "
            f"{self.cfg.batch_size * self.cfg.grad_accum * world} examples and the data order from here differs "
            "from an uninterrupted run (same epoch, same share of it); resume with the same number of processes "
            "for an exact continuation"
        )
        s.warnings.append(msg)
        self.log(f"warning: {msg}")

    def run_eval(self) -> dict:
        return self.evaluate()[0]

    def evaluate(self) -> tuple[dict, list[dict]]:
        """(the overall eval row, one row per task for a multi-task run); ({}, []) without eval examples."""
        if not self.eval_examples:
            return {}, []
        size = self.cfg.eval_batch_size or self.cfg.batch_size
        with self.precision.autocast():
            if self.task_eval is not None:
                return self.task_eval.evaluate(
                    self.objective, self.eval_examples, size, self.pad_id, self.dist
                )
            return eval_loss(self.objective, self.eval_examples, size, self.pad_id, self.dist), []

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> LoopState:
        """Train to the end; `resume` continues from the latest checkpoint (restored here unless `resume()` already
        ran, which a caller does to validate the checkpoint before it writes anything)."""
        if resume and self.resumed is None:
            self.resume()
        resumed = bool(self.resumed)
        barrier(
            self.dist, "the start"
        )  # every rank has read the checkpoint before rank 0 tidies the directory
        if self.dist.main:
            self._tidy_checkpoints()
            self.metrics = MetricsLog(
                self.run_dir / "metrics.jsonl", resume_step=self.state.step if resumed else None
            )
        else:
            self.metrics = _ReadMetrics(self.run_dir / "metrics.jsonl")
        with patches.applied(self.model, self.perf, malloc=self.precision.malloc):
            self._loop()
        return self.state

    def out_of_time(self) -> bool:
        """train.max_time is spent: the steps so far (state.train_time, checkpointed, so summed over resumes) took
        the budget. A distributed run stops when any rank's clock says so (all of them at the same step)."""
        out = self.cfg.max_time is not None and self.state.train_time >= self.cfg.max_time
        if self.cfg.max_time is not None and self.dist.active:
            out = all_sum([float(out)], self.device, self.dist)[0] > 0
        return out

    def _peers(self, what: str):
        """A distributed run: a collective that fails (a process died or hangs) -> DistributedError naming `what`."""
        if not self.dist.active:
            return contextlib.nullcontext()
        return peers(what, self.dist.rank, keep=(TrainingDiverged,))

    def _tidy_checkpoints(self) -> None:
        """Once the run has started: drop what interrupted writes left, and the checkpoints newer than the one
        resumed from (they failed to verify; the run replays their steps)."""
        for p in remove_partial(self.ckpt_root):
            self.log(f"removed {p.name}, left by an interrupted checkpoint write")
        for p in self._stale:
            shutil.rmtree(p, ignore_errors=True)
            self.log(f"removed {p.name}, which did not verify (the run replays its steps)")
        self._stale = []

    def _loop(self) -> None:
        callbacks = self.callbacks or []
        for cb in callbacks:
            cb.on_fit_start(self)
        self.objective.train()
        start = None  # where the running step began: an interrupt rewinds there, so resume replays it whole
        try:
            with self.interrupts.installed():
                while self.state.step < self.total_steps and not self.should_stop and not self.out_of_time():
                    start = (self.state.epoch, self.state.batch_idx, torch.get_rng_state())
                    with self._peers(f"step {self.state.step + 1}"):
                        result = self.step()
                        start = None
                        self.interrupts.settle()
                        for cb in callbacks:
                            cb.on_step_end(self, result)
                        self.interrupts.release()  # a Ctrl-C held over the step's end stops here
            if self.should_stop:
                self.state.status = "early-stopped"
            else:
                if self.state.step < self.total_steps:  # train.max_time: a clean stop, as at the last step
                    self.stopped_by = "max_time"
                    self.log(
                        f"train.max_time: {self.cfg.max_time:g} s of training reached at step {self.state.step}"
                    )
                for cb in callbacks:
                    cb.on_train_end(self)
                if self.stopped_by and self.saved_step != self.state.step:
                    self.save()  # resumable with a larger budget (after the final eval, as at any last step)
                self.state.status = "completed"
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            if start is not None:
                self.state.epoch, self.state.batch_idx, rng = start
                torch.set_rng_state(rng)
            self.state.status = "interrupted"
            for cb in callbacks:
                cb.on_interrupt(self)
            raise
        finally:
            for cb in callbacks:
                cb.on_fit_end(self)
