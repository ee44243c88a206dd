"""Run configuration: pydantic models, YAML loading, dotted `key=value` overrides, friendly errors."""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import ConfigError
from .methods import MethodConfigBase, get_method, method_names
from .strict import StrictModel

SEED_MAX = 2**32 - 1  # numpy's seeds; torch takes 64 bits, the data order (data/batching.py) reads 32


def _user_path(v: str | None) -> str | None:
    """A path from a config: not empty (that would be the working directory), `~` expanded; relative paths stay
    relative to the working directory."""
    if v is None:
        return v
    if not v.strip():
        raise ValueError("must be a path, not empty")
    return os.path.expanduser(v)


class ModelConfig(StrictModel):
    name: str = Field(
        ...,
        description="HF id | local dir | path/to/file.gguf | tiny-llama | tiny-gpt2 | tiny-bert | tiny-t5",
    )
    task: Literal["causal-lm", "seq-cls", "seq2seq", "masked-lm"] = Field(
        "causal-lm",
        description="What the model is trained to do; masked-lm (an encoder's MLM head) goes with train.objective: "
        "mlm, and is set by it when left out.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run model code from the model repo. Only --trust-remote-code on the command line turns it on: "
        "true here without the flag is an error for `sftlab train`, and ignored (with a warning) in a run directory "
        "that eval/generate/merge load.",
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    quantize: Literal["nf4", "int8"] | None = Field(
        None,
        description="Hold the frozen base's linear weights quantised (QLoRA): nf4 (4-bit NormalFloat, 64-blocks) or "
        "int8 (per-row absmax); heads, embeddings and norms keep model.dtype. For methods that freeze the base "
        "(lora, adapter, prefix, ptuning, prompt); rebuilt from the weights on every load, never saved.",
    )
    double_quant: bool = Field(
        True,
        description="nf4: store the block scales as int8 too (QLoRA double quantisation: 4.13 bits a weight, not 4.5).",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype quantised weights are decoded to for their GEMMs; null: model.dtype."
    )
    quant_backend: Literal["torch", "bitsandbytes"] = Field(
        "torch",
        description="Who holds the codes: torch (sftlab's NF4/int8 layers, pure PyTorch, any device; the same NF4 "
        "codes as torchao's NF4Tensor) | bitsandbytes (its Linear4bit/Linear8bitLt, as PEFT/TRL use; CUDA only).",
    )

    def quant_spec(self):
        """The `quant.QuantSpec` of this model (None when model.quantize is null)."""
        from .quant import QuantSpec

        if self.quantize is None:
            return None
        return QuantSpec(self.quantize, self.double_quant, self.compute_dtype, self.quant_backend)


class MixingConfig(StrictModel):
    """How often each task of `data.tasks` is sampled (data/mixture.py), for tasks i with n_i train examples."""

    strategy: Literal["proportional", "temperature", "equal", "weights"] = Field(
        "proportional",
        description="proportional: rate_i ∝ min(n_i, cap) (T5's examples-proportional mixing); temperature: "
        "rate_i ∝ min(n_i, cap)^(1/temperature) (1 = proportional, large = equal); equal: rate_i = 1/#tasks; "
        "weights: rate_i ∝ the task's `weight`. `mixing: equal` is short for `mixing: {strategy: equal}`.",
    )
    cap: int | None = Field(
        None,
        gt=0,
        description="K: a task counts as at most K examples (proportional and temperature); null: no cap.",
    )
    temperature: float | None = Field(
        None, gt=0, description="T of the temperature strategy (required there, e.g. 2; only there)."
    )

    @model_validator(mode="after")
    def _fits_strategy(self):
        s = self.strategy
        if s == "temperature" and self.temperature is None:
            raise ValueError("data.mixing.temperature: required by strategy temperature (e.g. 2)")
        if s != "temperature" and self.temperature is not None:
            raise ValueError(f"data.mixing.temperature: only used by strategy temperature (strategy is {s})")
        if s in ("equal", "weights") and self.cap is not None:
            raise ValueError(
                f"data.mixing.cap: only used by strategies proportional and temperature (strategy is {s})"
            )
        return self


class DataConfig(StrictModel):
    train: str | None = Field(
        None,
        description="json, jsonl, csv, tsv, parquet or txt file, or a directory of them. A relative path resolves "
        "against the working directory (as every path in a config does), `~` against your home. Several tasks: "
        "`tasks` instead (one or the other).",
    )
    eval: str | None = Field(None, description="Held-out file (a path like `train`); or use eval_fraction.")
    subset: str | None = Field(
        None,
        description="With `hf:ORG/NAME[:split]` in train/eval: the dataset's configuration (subset) name, e.g. sst2 "
        "of nyu-mll/glue. See README 'Datasets by name'.",
    )
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Split this share of train off for eval.")
    format: Literal["text", "alpaca", "messages", "sharegpt", "classification", "seq2seq"] = Field(
        "alpaca", description="Record layout."
    )
    max_length: int = Field(
        512, gt=0, description="Truncate examples to this many tokens (counted and reported)."
    )
    template: str = Field(
        "auto", description="Chat template: auto (the tokenizer's own, else chatml) | chatml | plain."
    )
    system_prompt: str | None = Field(
        None, description="System message added to chat formats when a record has none."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename record fields, e.g. {text: sentence, label: label} or {instruction: prompt}.",
    )
    label_names: list[str] | None = Field(
        None, description="Classification label order; default: sorted labels seen."
    )
    train_on_prompt: bool = Field(
        False, description="Also supervise prompt tokens (default: responses only)."
    )
    limit: int | None = Field(
        None, gt=0, description="Use only the first N records of each file (quick tries)."
    )
    documents: Literal["line", "paragraph", "file"] = Field(
        "line",
        description="How a .txt file splits into records (documents): one per non-empty line, one per run of "
        "non-blank lines (paragraph: blank lines separate documents), or the whole file.",
    )
    streaming: bool | None = Field(
        None,
        description="train.objective clm/mlm/span: read the text corpus a record at a time (.txt, .jsonl, .csv/.tsv) "
        "and keep its token blocks in a memory-mapped Arrow file in the temp directory (TMPDIR), so memory stays "
        "flat however large the corpus (the same blocks and draws as in memory). null: when the train files pass "
        "16 MiB. Supervised data (objective sft) is always read into memory.",
    )
    weight_field: str | None = Field(
        None,
        description="Name of a training-record field holding the example's loss weight (a number >= 0; a record "
        "without the field weighs 1): each of its supervised targets' loss is multiplied by it, as a task's "
        "loss_weight is. Self-training writes its pseudo-labelled rows with one (self_train.pseudo_weight). Eval "
        "records are never weighted. null: every example weighs 1.",
    )
    tasks: list[TaskConfig] | None = Field(
        None,
        description="Multi-task training: a list of tasks, each with its own name, train/eval files and record "
        "keys; a key a task leaves unset takes its value from `data:` (train and eval excepted). See README "
        "'Multi-task'.",
    )
    mixing: MixingConfig = Field(
        default_factory=MixingConfig, description="How often each of `tasks` is sampled (see data.mixing.*)."
    )

    @field_validator("train", "eval")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return _user_path(v)

    @field_validator("mixing", mode="before")
    @classmethod
    def _mixing_shorthand(cls, v: Any) -> Any:
        return {"strategy": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_or_many(self):
        """data.train (one task) or data.tasks (a mixture), never both; a task's unset keys come from `data:`."""
        if self.tasks is None:
            if self.weight_field is not None and not self.weight_field.strip():
                raise ValueError("data.weight_field: expected a record field name (or null)")
            if self.train is None:
                raise ValueError(
                    "data.train: required key is missing (or data.tasks: a list of tasks to mix)"
                )
            if self.mixing != MixingConfig():
                raise ValueError("data.mixing: mixes data.tasks; a run on one data.train has nothing to mix")
            return self
        if self.weight_field is not None:
            raise ValueError(
                "data.weight_field: weights the examples of one data.train; with data.tasks use each task's "
                "loss_weight"
            )
        for key in ("train", "eval"):
            if getattr(self, key) is not None:
                raise ValueError(
                    f"data.{key}: not with data.tasks (one or the other): give each task its own {key} "
                    f"(data.tasks[i].{key}), or drop data.tasks for a one-task run"
                )
        if not self.tasks:
            raise ValueError("data.tasks: expected at least one task")
        seen: dict[str, int] = {}
        for i, t in enumerate(self.tasks):
            if t.name in seen:
                raise ValueError(
                    f"data.tasks[{i}].name: {t.name!r} is taken by data.tasks[{seen[t.name]}]; names must be unique"
                )
            seen[t.name] = i
            if t.weight != 1.0 and self.mixing.strategy != "weights":
                raise ValueError(
                    f"data.tasks[{i}].weight: only used by data.mixing: weights (strategy is {self.mixing.strategy}); "
                    "drop it or set data.mixing: weights"
                )
            for k in TASK_RECORD_KEYS:  # resolved here, so the saved config.yaml holds what each task used
                if k not in t.model_fields_set:
                    t.__dict__[k] = getattr(self, k)
                    t.model_fields_set.add(k)
        return self

    @model_serializer(mode="wrap")
    def _without_unused(self, handler):
        """A one-task config saves as before (no tasks/mixing keys); a mixture saves no data.train/eval."""
        out = handler(self)
        drop = ("train", "eval") if self.tasks is not None else ("tasks", "mixing")
        drop += ("weight_field",) if self.weight_field is None else ()  # configs without it save as before
        drop += ("streaming",) if self.streaming is None else ()  # likewise
        drop += ("subset",) if self.subset is None else ()
        return {k: v for k, v in out.items() if k not in drop}


def _data_field(key: str) -> Any:
    """DataConfig's field `key` (type bounds, default, description) for the task key that means the same."""
    return copy.deepcopy(DataConfig.model_fields[key])


TASK_RECORD_KEYS = ("eval_fraction", "format", "max_length", "template", "system_prompt", "columns", "label_names",
                    "train_on_prompt", "limit")  # fmt: skip
_FORMAT = DataConfig.model_fields["format"].annotation


class TaskConfig(StrictModel):
    """One task of `data.tasks`: its data (the keys mean what they mean under `data:`) and how it is mixed."""

    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="Unique task name (letters, digits, _ and -): names the task in logs, metrics and outputs.",
    )
    train: str = Field(..., description="The task's training file or directory (as data.train).")
    eval: str | None = Field(None, description="The task's held-out file; or eval_fraction.")
    eval_fraction: float = _data_field("eval_fraction")
    format: _FORMAT = _data_field("format")
    max_length: int = _data_field("max_length")
    template: str = _data_field("template")
    system_prompt: str | None = Field(
        None,
        description="As data.system_prompt; for a classification task on a text model it is the instruction "
        "the label answers.",
    )
    columns: dict[str, str] = _data_field("columns")
    label_names: list[str] | None = Field(
        None,
        description="As data.label_names; a classification task on a text model answers with these names when "
        "its labels are indices (0 -> label_names[0]).",
    )
    train_on_prompt: bool = _data_field("train_on_prompt")
    limit: int | None = _data_field("limit")
    weight: float = Field(
        1.0, gt=0, description="Sampling weight, used by data.mixing: weights (rate_i ∝ weight_i)."
    )
    loss_weight: float = Field(
        1.0,
        gt=0,
        description="Multiplies the loss of each of this task's supervised tokens. The step loss is "
        "sum_tokens loss_weight(task of token) * token loss / (supervised tokens in the step), so 1 everywhere is "
        "the plain per-token mean, and a weight acts on the gradient like a per-task learning-rate factor.",
    )
    metric: Literal["exact", "f1"] | None = Field(
        None,
        description="Generation metric of the task's evaluation: exact match or token F1 (SQuAD's) of greedy "
        "answers against the reference answer, on at most train.eval_generate_limit eval examples; both are "
        "logged, this one is the task's headline. Classification tasks report accuracy instead.",
    )

    @field_validator("train", "eval")
    @classmethod
    def _paths(cls, v: str | None) -> str | None:
        return _user_path(v)


DataConfig.model_rebuild()


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


class PerfConfig(StrictModel):
    """Speed and memory levers. Each gives the same loss and gradients as the plain path (a test checks it), so
    none changes what is learned; measurements are in benchmarks/README.md. Defaults are the fast settings."""

    loss_chunk_size: int = Field(
        512,
        gt=0,
        description="Supervised positions per LM-head chunk: bigger chunks run the head GEMM faster and hold a bigger "
        "(chunk x vocab) fp32 logits buffer.",
    )
    packing: bool | None = Field(
        None,
        description="Padding-free batches for causal-lm: a micro-batch's examples in one row, positions restarting per "
        "example. null (auto): on when a quick check shows the model keeps packed examples apart (it does not with "
        "prompt/prefix methods); true: require it; false: padded batches.",
    )
    micro_batch_tokens: int | None = Field(
        1024,
        gt=0,
        description="Memory cap: a micro-batch over this many tokens runs as several passes accumulated into the same "
        "step (same gradient, activations bounded by the cap). null: one pass per micro-batch.",
    )
    malloc_mmap_threshold: int | None = Field(
        None,
        gt=0,
        description="Low-memory mode (Linux/glibc, while training): blocks of at least this many bytes (e.g. 262144) "
        "get their own mmap, so freed activations go back to the OS; lower peak RSS, slower steps. null: off.",
    )
    malloc_retain: bool = Field(
        True,
        description="Linux/glibc, while training: freed activations stay mapped for the next step instead of being "
        "returned and page-faulted back in. Ignored when malloc_mmap_threshold is set.",
    )
    varlen_attention: bool = Field(
        True, description="Packed rows: sdpa per example instead of one masked product over the whole row."
    )
    fused_loss: bool = Field(
        True,
        description="Fused LM head + cross-entropy (gradients in the forward pass); false: checkpointed chunks.",
    )
    trim_last_mlp: bool = Field(
        True, description="Causal LMs: the last block's MLP runs only on positions the loss reads."
    )
    fused_optimizer: bool = Field(
        True,
        description="torch's fused AdamW kernel where the parameters allow (same update, no temporaries).",
    )
    fused_rope: bool = Field(
        True,
        description="Causal LMs: rotary embeddings as one autograd node per tensor, where a probe shows the same values.",
    )
    onednn_gemm: bool = Field(
        True,
        description="CPU fp32: the big GEMMs through oneDNN instead of MKL where torch runs AVX-512 kernels and "
        "oneDNN passes an exactness probe.",
    )


PERF_KEYS = tuple(PerfConfig.model_fields)


class RunConfig(StrictModel):
    model: ModelConfig
    method: SerializeAsAny[MethodConfigBase] = Field(default_factory=lambda: get_method("full").config())
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    perf: PerfConfig = Field(default_factory=PerfConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _dispatch_method(cls, v: Any) -> Any:
        if isinstance(v, MethodConfigBase):
            return v
        if v is None:
            v = {"name": "full"}
        if not isinstance(v, dict) or "name" not in v:
            raise ValueError(f"method must be a mapping with a 'name' ({', '.join(method_names())})")
        name = v["name"]
        if name not in method_names():
            hint = _suggest(str(name), method_names())
            raise ValueError(f"method.name: {name!r} is not one of {', '.join(method_names())}{hint}")
        spec = get_method(name)
        try:
            return spec.config(**v)
        except ValidationError as e:
            raise ValueError("\n  ".join(_error_lines(e, prefix="method", model=spec.config))) from None

    @model_validator(mode="after")
    def _task_kinds(self):
        """seq-cls mixtures: classification tasks, one head each. method.per_task: one adapter per task."""
        tasks = self.data.tasks
        if tasks is not None and self.model.task == "seq-cls":
            for i, t in enumerate(tasks):
                if t.format != "classification":
                    raise ValueError(
                        f"data.tasks[{i}].format: {t.format!r} on a seq-cls model; each task gets a classification "
                        "head, so each needs format classification (text tasks: model.task causal-lm or seq2seq)"
                    )
        if self.method.per_task:
            name = self.method.name
            if tasks is None:
                raise ValueError(
                    "method.per_task: true gives each of data.tasks its own adapter; a run on one data.train has one "
                    "task (drop the key, or list the tasks under data.tasks)"
                )
            if name in ("full", "freeze"):
                raise ValueError(
                    f"method.per_task: {name} trains the shared weights themselves, so there is no adapter to give "
                    "each task; use method.name lora or adapter for one adapter per task, or per_task: false"
                )
            if get_method(name).route is None:
                raise ValueError(
                    f"method.per_task: {name} cannot hold one adapter per task yet (its virtual tokens are one "
                    "prompt for the whole batch, not chosen per row); use lora or adapter, or per_task: false"
                )
            if getattr(self.method, "modules_to_save", None):
                raise ValueError(
                    "method.modules_to_save: not with per_task: true (a per-task copy of a whole module is not "
                    "routed per row); seq-cls heads are per task already. Drop it, or use per_task: false"
                )
            if self.train.gradient_checkpointing:
                raise ValueError(
                    "train.gradient_checkpointing: not with method.per_task: true (the forward recomputed in backward "
                    "would not see each row's task); turn one of them off"
                )
        return self

    @model_validator(mode="after")
    def _objective(self):
        """A self-supervised objective reads one text corpus and fixes the model's head (the task kind)."""
        obj, needs = self.train.objective, {"clm": "causal-lm", "mlm": "masked-lm", "span": "seq2seq"}
        if obj == "sft":
            if self.model.task == "masked-lm":
                raise ValueError(
                    "model.task: masked-lm trains with train.objective: mlm (on unlabelled text); set it, or pick "
                    "the task of the supervised stage (seq-cls for a classifier)"
                )
            return self
        if "task" not in self.model.model_fields_set:
            self.model.task = needs[obj]
        elif self.model.task != needs[obj]:
            raise ValueError(
                f"model.task: {self.model.task!r} does not fit train.objective: {obj}, which trains a "
                f"{needs[obj]} model; set model.task: {needs[obj]} or leave it out"
            )
        if self.data.weight_field is not None:
            raise ValueError(
                f"data.weight_field: weights supervised examples; train.objective: {obj} reads unlabelled text"
            )
        if self.data.tasks is not None:
            raise ValueError(
                f"train.objective: {obj} trains on one text corpus (data.train); data.tasks is for supervised mixtures"
            )
        if "format" not in self.data.model_fields_set:
            self.data.format = "text"
        elif self.data.format != "text":
            raise ValueError(
                f"data.format: {self.data.format!r}: train.objective: {obj} reads unlabelled text; set data.format: text"
            )
        return self

    @model_validator(mode="after")
    def _quantized_base(self):
        """A quantised base is frozen: only methods that train something beside it can use one."""
        q = self.model.quantize
        if q is None:
            return self
        if self.method.name in ("full", "freeze"):
            raise ValueError(
                f"model.quantize: {q} freezes the base's linear weights as {q} codes, and method.name: "
                f"{self.method.name} trains them; use lora, adapter, prefix, ptuning or prompt on a quantised base, "
                "or drop model.quantize"
            )
        if getattr(self.method, "init", None) == "pissa":
            raise ValueError(
                f"method.init: pissa rewrites the base weights to their residual, and model.quantize: {q} holds them "
                "as frozen codes; use init default or gaussian, or drop model.quantize"
            )
        return self

    @model_validator(mode="after")
    def _precision(self):
        """Pure bf16 rounds every update into bf16 weights: only full fine-tuning, whose weights are all trained."""
        if self.train.precision == "bf16" and self.method.name != "full":
            raise ValueError(
                f"train.precision: bf16 (pure bf16 weights) is for method.name: full; with {self.method.name} use "
                "bf16-mixed (the frozen base runs in bf16, the trained parameters stay fp32)"
            )
        return self

    @model_validator(mode="after")
    def _task_diagnostics(self):
        if self.train.task_grad_cosine_every is not None and self.data.tasks is None:
            raise ValueError(
                "train.task_grad_cosine_every: compares the gradients of data.tasks; a run on one data.train has "
                "no tasks to compare (drop the key, or list the tasks under data.tasks)"
            )
        if self.train.task_balancing is not None and self.data.tasks is None:
            raise ValueError(
                f"train.task_balancing: {self.train.task_balancing} balances the gradients of data.tasks; a run on "
                "one data.train has no tasks to balance (drop the key, or list the tasks under data.tasks)"
            )
        return self


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(model: type[StrictModel] | None, loc: tuple) -> type[StrictModel] | None:
    for part in loc:
        if model is None:
            return None
        if str(part).startswith("[") or str(part).isdigit():
            continue  # an item of a list of sections (data.tasks[i])
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = _section(field.annotation)
    return model


def _section(ann: Any) -> type[StrictModel] | None:
    """The config section an annotation holds: X, X | None or list[X] for a StrictModel X."""
    if isinstance(ann, type) and not typing.get_args(ann) and issubclass(ann, StrictModel):
        return ann
    return next((m for m in map(_section, typing.get_args(ann)) if m is not None), None)


def _format_errors(err: ValidationError) -> str:
    return "invalid config:\n  " + "\n  ".join(_error_lines(err))


def _error_lines(err: ValidationError, prefix: str = "", model: type[StrictModel] | None = None) -> list[str]:
    model = model or RunConfig
    lines = []
    for e in err.errors():
        loc = tuple(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"])
        key = ".".join(((prefix,) if prefix else ()) + loc).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            options = list(parent.model_fields) if parent else []
            lines.append(f"{key}: unknown key{_suggest(loc[-1], options)}; allowed: {', '.join(options)}")
            continue
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"{key}: {e.get('input')!r} is not allowed; expected {allowed}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        elif (msg.startswith("method") or msg.startswith(key)) and ":" in msg.split(" ")[0]:
            lines.append(msg)  # already phrased by the method dispatcher or a validator naming its key
        else:
            lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return lines


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: plain YAML keeps the second one
    silently (`lr: 1e-4` ... `lr: 1e-3` trains at 1e-3). Merge keys (`<<: *base`) may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}  # key -> its line
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, seen[key] + 1)
                seen[key] = key_node.start_mark.line
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep)


def load_yaml(text: str, source: str) -> Any:
    """YAML as safe_load reads it, with a duplicate key or a syntax error as a ConfigError naming `source`:line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise ConfigError(
            f"{source}:{e.line}: duplicate key {e.key!r} (first on line {e.first}); give each key once"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` pairs, each value parsed as YAML, merged into one nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, _, raw = item.partition("=")
        value = load_yaml(raw, f"override {item!r}") if raw != "" else None
        if isinstance(value, str):
            value = _yaml_float(value)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out


def _yaml_float(s: str) -> Any:
    """YAML 1.1 reads '1e-4' as a string; users mean a number."""
    try:
        return float(s) if any(c in s for c in "eE.") and s.strip()[0] in "0123456789-+." else s
    except ValueError:
        return s


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats(v) for v in node]
    return _yaml_float(node) if isinstance(node, str) else node


def _moved_keys(raw: dict) -> list[str]:
    """Keys that moved from `train:` to `perf:` (the speed levers), each named with its new place."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return []
    return [f"train.{k} moved to perf.{k}" for k in train if k in PERF_KEYS]


def migrate_moved_keys(raw: dict) -> dict:
    """A run directory's own config.yaml from before `perf:` existed: move its levers (ours to move)."""
    train = raw.get("train")
    if not isinstance(train, dict):
        return raw
    moved = {k: train.pop(k) for k in list(train) if k in PERF_KEYS}
    if moved:
        raw["perf"] = {**moved, **(raw.get("perf") or {})}
    return raw


def build_config(raw: dict, source: str = "config") -> RunConfig:
    moved = _moved_keys(raw)
    if moved:
        raise ConfigError(f"{source}: " + "; ".join(moved))
    try:
        return RunConfig.model_validate(_floats(raw))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except ValidationError as e:
        raise ConfigError(f"{source}: {_format_errors(e)}") from None


def require_remote_code_flag(cfg: RunConfig, flag: bool, source: str) -> RunConfig:
    """The remote-code rule for a config the user runs: a model repo's code runs only when the user passes
    --trust-remote-code on the command line (`flag`), which turns model.trust_remote_code on. The config alone
    cannot: a YAML you were sent, or a key you forgot, must never run code."""
    if flag:
        cfg.model.trust_remote_code = True
    elif cfg.model.trust_remote_code:
        raise ConfigError(
            f"{source}: model.trust_remote_code: true would run code from {cfg.model.name!r}, which a config cannot "
            "turn on by itself; add --trust-remote-code to the command if you trust that code"
        )
    return cfg


def ignore_saved_remote_code(cfg: RunConfig, flag: bool, source: str) -> RunConfig:
    """The remote-code rule for a run directory's saved config (eval, generate, merge): a run dir may come from
    anywhere, so its `trust_remote_code: true` is ignored with a warning; only `flag` (--trust-remote-code on the
    command line) turns remote code on."""
    if cfg.model.trust_remote_code and not flag:
        warnings.warn(
            f"{source}: model.trust_remote_code: true ignored (a run directory cannot turn on remote code); "
            "pass --trust-remote-code to run the model's own code if you trust this run directory",
            stacklevel=3,
        )
    cfg.model.trust_remote_code = flag
    return cfg


def _config_relative_paths(raw: dict, config: Path) -> None:
    """Relative paths resolve against the working directory only. Before, a data path missing there was looked up
    beside the config; name the path that meant, rather than silently reading another file or none."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    sections = [("data", data)] + [
        (f"data.tasks[{i}]", t) for i, t in enumerate(tasks) if isinstance(t, dict)
    ]
    for where, section in sections:
        for k in ("train", "eval"):
            v = section.get(k)
            if not isinstance(v, str) or not v.strip() or Path(os.path.expanduser(v)).exists():
                continue
            beside = config.parent / v
            if not Path(v).is_absolute() and beside.exists():
                raise ConfigError(
                    f"{config}: {where}.{k}: {v!r} does not exist from the working directory ({os.getcwd()}); "
                    "relative paths in a config resolve against the working directory, not the config's folder: "
                    f"did you mean {os.path.relpath(beside)!r}?"
                )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    migrate: bool = False,
    trust_remote_code: bool = False,
) -> RunConfig:
    """Load YAML (optional), apply dotted overrides, validate.

    Every relative path (data.train, data.eval, train.output_dir) resolves against the working directory, as a path
    typed in the shell or given as an override does, so `data.train=x.jsonl` and `data: {train: x.jsonl}` mean the
    same file and a config runs the same from wherever it is kept; `~` is expanded.
    trust_remote_code: the user's --trust-remote-code (require_remote_code_flag).
    migrate: a run directory's saved config, whose pre-`perf:` lever keys are moved rather than refused; its
    remote-code setting is left for the loader of the run to judge (ignore_saved_remote_code)."""
    raw: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        raw = load_yaml(p.read_text(), str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping with model/method/data/train")
        source = str(p)
    if migrate:
        raw = migrate_moved_keys(raw)
    raw = deep_merge(raw, parse_overrides(overrides or []))
    if not migrate:  # datasets.yaml names -> their files (a run's saved config holds those already)
        from .data.registry import resolve_names

        raw = resolve_names(raw, path)
    if path is not None and not migrate:
        _config_relative_paths(raw, Path(path))
    cfg = build_config(raw, source)
    return cfg if migrate else require_remote_code_flag(cfg, trust_remote_code, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump_config(cfg))
