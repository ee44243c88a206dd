"""The `train:` section: length, optimizer and schedule, evaluation and checkpoints, objective, device."""

from __future__ import annotations

import re
import warnings
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..strict import StrictModel
from .paths import _user_path

SEED_MAX = 2**32 - 1  # numpy's seeds; torch takes 64 bits, the data order (data/batching.py) reads 32


class TrainConfig(StrictModel):
    output_dir: str = Field(
        "runs/demo",
        description="Run directory. A relative path resolves against the working directory (as every path in a "
        "config does), `~` against your home; empty is an error (it would mean the working directory itself).",
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; or epochs.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (used when max_steps is unset)."
    )
    max_time: float | None = Field(
        None,
        gt=0,
        description="Wall-clock budget in seconds of training steps (eval and checkpoint writes not counted; summed "
        "over resumes): the run stops cleanly at the first step that reaches it, evaluates, writes a checkpoint "
        "and final/, and can be resumed with a larger budget. max_steps/epochs still bound the run and set the "
        "learning-rate schedule's length (as Lightning's Trainer(max_time=...)).",
    )
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (not applied to biases and norms)."
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(
        1.0, description="Clip gradients to this norm (> 0); null disables clipping."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    eval_every: int | None = Field(None, gt=0, description="Evaluate every N steps (and at the end).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps.")
    keep_last: int = Field(2, gt=0, description="Keep this many checkpoints.")
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop after N evals without improvement."
    )
    log_every: int = Field(1, gt=0, description="Log a metrics row every N steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers that also receive the metrics.jsonl rows, the config and a final summary "
        "(any subset; each an optional extra, imported only when named). See README 'Tracking' for where each "
        "writes and its offline/local mode.",
    )
    eval_batch_size: int | None = Field(None, gt=0, description="Default: batch_size.")
    eval_generate_limit: int = Field(
        64,
        ge=0,
        description="data.tasks: at each eval, greedy answers are generated for at most this many of a task's eval "
        "examples (its first ones) to score classification-as-text accuracy and a task's `metric` (exact, f1); "
        "0: no generation, loss only.",
    )
    task_balancing: Literal["pcgrad"] | None = Field(
        None,
        description="data.tasks: pcgrad projects each task's gradient off the other tasks' it conflicts with "
        "(negative dot product) before the update (Yu et al. 2020); costs one forward and backward per task in "
        "each micro-batch instead of one. null: the plain summed gradient.",
    )
    task_grad_cosine_every: int | None = Field(
        None,
        gt=0,
        description="data.tasks: every N steps, log the cosine similarity of each pair of tasks' gradients, each on a "
        "probe batch of batch_size of its own training examples (metrics.jsonl `task_grad_cosine`, "
        "task_conflict.png); costs one extra forward and backward per task on those steps and leaves training "
        "unchanged. null: off.",
    )
    seed: int = Field(
        0,
        description=f"Seed for init, data order and dropout, in [0, {SEED_MAX}] (numpy's range; the data order "
        "reads 32 bits, so larger seeds would repeat smaller ones).",
    )
    group_by_length: bool = Field(True, description="Length-bucketed batches (less padding).")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget per micro-batch (count x longest example), replacing batch_size: short examples "
        "make big batches, long ones small, so step time and memory stay even. null: batch_size examples.",
    )
    threads: int | None = Field(
        None,
        gt=0,
        description="torch threads, fixed; default: the physical cores other processes leave free, at start and "
        "rechecked every 3 s while training (sftlab/threads.py).",
    )
    objective: Literal["sft", "clm", "mlm", "span"] = Field(
        "sft",
        description="sft: supervised (the data's responses or labels); self-supervised on unlabelled text (data.format: "
        "text): clm (causal-lm: next token on every token of blocks of data.max_length), mlm (masked-lm: BERT's "
        "masking, re-drawn each epoch), span (seq2seq: T5's span corruption). See README 'Unlabelled data'.",
    )
    noise_density: float = Field(
        0.15,
        gt=0,
        lt=1,
        description="mlm: the share of tokens chosen for masking; span: the share of tokens corrupted.",
    )
    mean_span_length: float = Field(3.0, ge=1, description="span: mean length of a corrupted span (T5: 3).")
    device: str = Field(
        "auto",
        description="Where training runs: auto (CUDA when available, else cpu) | cpu | cuda | cuda:N | mps. Model, "
        "method parameters, batches and optimizer state live there; checkpoints are saved device-independent.",
    )
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"] = Field(
        "fp32",
        description="fp32 | bf16-mixed (autocast to bf16, fp32 weights and optimizer state) | fp16-mixed (CUDA "
        "only: autocast to fp16 with a gradient scaler) | bf16 (pure bf16 weights and optimizer state; "
        "method.name: full only). Trainable LoRA/adapter/prefix parameters stay fp32 in the mixed modes.",
    )
    distributed: Literal["ddp", "fsdp"] | None = Field(
        None,
        description="Under torchrun (or --nproc N): ddp (each process a full copy, gradients all-reduced) or fsdp "
        "(FSDP2: parameters, gradients and optimizer state sharded; method.name full, or a PEFT method over a "
        "sharded frozen base). null: ddp when started by torchrun with more than one process, else one process.",
    )
    dist_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Distributed runs: seconds a process waits on the others (a collective) before it gives up with "
        "an error naming the step; a process that died stops the rest within this time.",
    )
    progress: bool = Field(
        True,
        description="Show progress: a bar on a terminal; otherwise (a log, a pipe) a plain line at step 1, "
        "every max(log_every, 5% of the run) steps, at least every 30 s and at the end. false: neither.",
    )

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        return _user_path(v)

    @field_validator("max_grad_norm")
    @classmethod
    def _clip(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("must be > 0 or null")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError(f"{v!r} is not a device; expected auto, cpu, cuda, cuda:N or mps")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"must be in [0, {SEED_MAX}]")
        return v

    def warn_long_warmup(self, total_steps: int) -> None:
        """A warning, not an error: the run's length is known only once the data is loaded (epochs), and a quick
        try that cuts max_steps below a config's warmup still trains; but the learning rate never decays."""
        if self.warmup_steps and self.warmup_steps >= total_steps:
            warnings.warn(
                f"train.warmup_steps: {self.warmup_steps} is not shorter than the run ({total_steps} steps): the "
                f"learning rate only rises, to {min(1.0, total_steps / self.warmup_steps):.0%} of train.lr, and "
                "never decays; lower warmup_steps",
                stacklevel=2,
            )

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.epochs is None:
            self.__dict__["epochs"] = 1.0
        return self
