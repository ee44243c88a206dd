"""The training loop: accumulation with per-token normalisation, schedule, clipping, eval, early stopping,
atomic checkpoints, exact resume, NaN guard and clean Ctrl-C.

It sees only a model whose trainable parameters have requires_grad=True and lists of encoded examples;
it knows nothing about which method produced the parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import gemm
from ..config import TrainConfig
from ..data.batching import balanced_parts, collate, collate_packed, epoch_batches, token_budget_batches
from ..eval.evaluate import evaluate
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .loss import compute_loss, count_supervised
from .memory import release_retained_memory, retain_freed_memory, set_malloc_mmap_threshold
from .metrics import MetricsLog, plot_loss
from .optim import build_optimizer, build_scheduler
from .packing import resolve_packing
from .progress import Progress


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


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
    status: str = "running"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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
    state: LoopState = field(default_factory=LoopState)

    def __post_init__(self) -> None:
        c = self.cfg
        self.lengths = [len(e["input_ids"]) for e in self.train_examples]
        self.packing = resolve_packing(c.packing, self.task, self.model, self.train_examples, self.log)
        self.batches_per_epoch = len(self._epoch(0))
        if c.max_steps:
            self.total_steps = c.max_steps
        else:
            self.total_steps = max(1, math.ceil(c.epochs * self.batches_per_epoch / c.grad_accum))
        self.optimizer = build_optimizer(self.model, c.lr, c.weight_decay, c.betas, c.fused_optimizer)
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, c.warmup_steps, c.schedule)
        self.ckpt_root = self.run_dir / "checkpoints"

    # -- data -----------------------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> list[list[int]]:
        c = self.cfg
        if c.max_tokens:
            return token_budget_batches(self.lengths, c.max_tokens, c.seed, epoch)
        return epoch_batches(self.lengths, c.batch_size, c.seed, epoch, c.group_by_length)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Packed (one row, no pad) or padded, per the resolved `packing`."""
        return (
            collate_packed(examples, self.task) if self.packing else collate(examples, self.pad_id, self.task)
        )

    def split_by_tokens(self, idx: list[int]) -> list[list[int]]:
        """A batch cut into consecutive parts of at most `micro_batch_tokens` tensor tokens (one example may exceed).

        The parts are accumulated into the same optimizer step with the step's supervised-token count as the
        normaliser, so the gradient is the batch's own; only the activations alive at once shrink. Balanced
        (see `balanced_parts`): the largest pass sets the peak memory.
        """
        cap = self.cfg.micro_batch_tokens
        return balanced_parts(idx, self.lengths, cap, self.packing) if cap else [idx]

    def _micro_batches(self) -> Iterator[list[int]]:
        """Endless stream from the saved position: the same order whether or not the run was resumed."""
        while True:
            batches = self._epoch(self.state.epoch)
            while self.state.batch_idx < len(batches):
                idx = batches[self.state.batch_idx]
                self.state.batch_idx += 1
                yield idx
            self.state.epoch += 1
            self.state.batch_idx = 0

    # -- one optimizer step ---------------------------------------------------------------------------
    def train_step(self, micro: list[dict]) -> tuple[float, int, int]:
        """Forward/backward over the micro-batches, normalised by the supervised tokens of all of them."""
        n_total = sum(count_supervised(b, self.task) for b in micro)
        if n_total == 0:
            return 0.0, 0, 0
        loss_sum = 0.0
        real = 0
        dnn = self.cfg.onednn_gemm
        for batch in micro:
            with gemm.enabled(dnn), gemm.linears(self.model, dnn):  # forward and backward (gemm.py)
                loss, _ = compute_loss(
                    self.model, batch, self.task, self.cfg.loss_chunk_size, **self._loss_options()
                )
                (loss / n_total).backward()
            loss_sum += float(loss.detach())
            real += (
                int(batch["attention_mask"].sum())
                if "attention_mask" in batch
                else batch["input_ids"].numel()
            )
        return loss_sum / n_total, n_total, real

    def _loss_options(self) -> dict:
        """Only the levers switched off (the defaults stay implicit)."""
        c = self.cfg
        levers = (
            ("fused", c.fused_loss),
            ("varlen_attn", c.varlen_attention),
            ("trim_last_mlp", c.trim_last_mlp),
            ("fused_rope", c.fused_rope),
        )
        return {k: False for k, on in levers if not on}

    def _optimizer_step(self) -> float:
        gnorm = float("nan")
        if self.cfg.max_grad_norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    # -- checkpoints ----------------------------------------------------------------------------------
    def save(self) -> Path:
        return save_checkpoint(
            self.ckpt_root,
            self.state.step,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state.to_dict(),
            self.cfg.keep_last,
        )

    def resume(self) -> bool:
        ckpts = list_checkpoints(self.ckpt_root)
        if not ckpts:
            return False
        raw = load_checkpoint(ckpts[-1], self.model, self.optimizer, self.scheduler)
        self.state = LoopState(**{k: raw[k] for k in LoopState().to_dict() if k in raw})
        self.state.status = "running"
        self.log(f"resumed from {ckpts[-1]} (step {self.state.step}, epoch {self.state.epoch})")
        return True

    # -- eval -----------------------------------------------------------------------------------------
    def run_eval(self) -> dict:
        if not self.eval_examples:
            return {}
        bs = self.cfg.eval_batch_size or self.cfg.batch_size
        return evaluate(self.model, self.eval_examples, self.task, bs, self.pad_id, self.cfg.loss_chunk_size)

    def _eval_and_maybe_stop(self, metrics: MetricsLog) -> bool:
        res = self.run_eval()
        if not res:
            return False
        self.state.last_eval = res
        metrics.write({"step": self.state.step, **res})
        self.log(f"step {self.state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items()))
        if self.state.best_eval is None or res["eval_loss"] < self.state.best_eval:
            self.state.best_eval, self.state.bad_evals = res["eval_loss"], 0
            return False
        self.state.bad_evals += 1
        patience = self.cfg.early_stopping_patience
        return bool(patience and self.state.bad_evals >= patience)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> LoopState:
        c = self.cfg
        retained = False  # see train/memory.py
        if c.malloc_mmap_threshold:
            set_malloc_mmap_threshold(c.malloc_mmap_threshold)
        elif c.malloc_retain:
            retained = retain_freed_memory()
        resumed = self.resume() if resume else False
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.state.step if resumed else None)
        self.model.train()
        stream = self._micro_batches()
        progress = Progress(self.total_steps, enabled=c.progress)
        progress.start(self.state.step)
        step_start = None
        try:
            while self.state.step < self.total_steps:
                t0 = time.perf_counter()
                # Where this step starts: an interrupt mid-step rewinds here, so resume replays the whole step.
                step_start = (self.state.epoch, self.state.batch_idx, torch.get_rng_state())
                micro = [
                    self.collate([self.train_examples[i] for i in part])
                    for _ in range(c.grad_accum)
                    for part in self.split_by_tokens(next(stream))
                ]
                loss, n_sup, real = self.train_step(micro)
                if not math.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.status = "diverged"
                    raise TrainingDiverged(
                        f"loss is {loss} at step {self.state.step + 1}; stopped. The last good checkpoint is kept "
                        f"in {self.ckpt_root}. Try a lower train.lr."
                    )
                lr = self.scheduler.get_last_lr()[0]
                gnorm = self._optimizer_step()
                s = self.state
                s.step += 1
                step_start = None
                dt = time.perf_counter() - t0
                s.tokens += real
                s.supervised += n_sup
                s.train_time += dt
                s.last_loss = loss
                tps = real / dt if dt > 0 else 0.0
                if s.step % c.log_every == 0 or s.step == self.total_steps:
                    metrics.write(
                        {
                            "step": s.step,
                            "loss": loss,
                            "lr": lr,
                            "tokens_per_s": tps,
                            "grad_norm": gnorm,
                            "epoch": s.epoch + s.batch_idx / max(1, self.batches_per_epoch),
                        }
                    )
                progress.update(s.step, loss=loss, lr=lr, tps=tps)
                stop = False
                if c.eval_every and s.step % c.eval_every == 0 and s.step < self.total_steps:
                    stop = self._eval_and_maybe_stop(metrics)
                if c.save_every and s.step % c.save_every == 0:
                    self.save()
                if stop:
                    self.log(
                        f"early stopping at step {s.step}: no eval improvement in {c.early_stopping_patience} evals"
                    )
                    s.status = "early-stopped"
                    break
            if self.state.status == "running":
                self._eval_and_maybe_stop(metrics)
                self.state.status = "completed"
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            if step_start is not None:
                self.state.epoch, self.state.batch_idx, rng = step_start
                torch.set_rng_state(rng)
            self.state.status = "interrupted"
            path = self.save()
            self.log(
                f"interrupted: checkpoint saved to {path}; continue with `sftlab train <config> --resume`"
            )
            raise
        finally:
            progress.stop()
            if retained:  # the process goes on (notebooks, sweeps): let the heap shrink again
                release_retained_memory()
            if (self.run_dir / "metrics.jsonl").exists():
                plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        return self.state
