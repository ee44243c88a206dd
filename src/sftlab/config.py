"""Run configuration: pydantic models, YAML loading, dotted `key=value` overrides, friendly errors."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods import MethodConfigBase, get_method, method_names
from .strict import StrictModel


class ModelConfig(StrictModel):
    name: str = Field(
        ...,
        description="HF id | local dir | path/to/file.gguf | tiny-llama | tiny-gpt2 | tiny-bert | tiny-t5",
    )
    task: Literal["causal-lm", "seq-cls", "seq2seq"] = Field(
        "causal-lm", description="What the model is trained to do."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype; float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code from the model repo. Off unless you trust it."
    )
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")


class DataConfig(StrictModel):
    train: str = Field(..., description="json, jsonl, csv, tsv, parquet or txt file, or a directory of them.")
    eval: str | None = Field(None, description="Held-out file; or use eval_fraction.")
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


class TrainConfig(StrictModel):
    output_dir: str = Field("runs/demo", description="Run directory.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; or epochs.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training data (used when max_steps is unset)."
    )
    batch_size: int = Field(8, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (not applied to biases and norms)."
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="LR schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, description="Clip gradients to this norm; null disables.")
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
    eval_batch_size: int | None = Field(None, gt=0, description="Default: batch_size.")
    seed: int = Field(0, description="Seed for init, data order and dropout.")
    group_by_length: bool = Field(True, description="Length-bucketed batches (less padding).")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget per micro-batch (count x longest example), replacing batch_size: short examples "
        "make big batches, long ones small, so step time and memory stay even. null: batch_size examples.",
    )
    threads: int | None = Field(None, gt=0, description="torch threads; default: physical cores.")
    progress: bool = Field(
        True,
        description="Show progress: a bar on a terminal; otherwise (a log, a pipe) a plain line at step 1, "
        "every max(log_every, 5% of the run) steps, at least every 30 s and at the end. false: neither.",
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


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(model: type[StrictModel] | None, loc: tuple) -> type[StrictModel] | None:
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, StrictModel) else None
    return model


def _format_errors(err: ValidationError) -> str:
    return "invalid config:\n  " + "\n  ".join(_error_lines(err))


def _error_lines(err: ValidationError, prefix: str = "", model: type[StrictModel] | None = None) -> list[str]:
    model = model or RunConfig
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(((prefix,) if prefix else ()) + loc)
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
        elif msg.startswith("method") and ":" in msg.split(" ")[0]:
            lines.append(msg)  # already phrased by the method dispatcher
        else:
            lines.append(f"{key}: {msg} (got {e.get('input')!r})")
    return lines


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b=value` pairs, each value parsed as YAML, merged into one nested dict."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=1e-4)")
        key, _, raw = item.partition("=")
        value = yaml.safe_load(raw) if raw != "" else None
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


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, migrate: bool = False
) -> RunConfig:
    """Load YAML (optional), apply dotted overrides, validate. Relative data paths resolve against the YAML's folder
    only when they do not exist relative to the working directory. migrate: a run directory's saved config, whose
    pre-`perf:` lever keys are moved rather than refused."""
    raw: dict = {}
    source = "overrides"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: top level must be a mapping with model/method/data/train")
        source = str(p)
        data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
        for k in ("train", "eval"):
            v = data.get(k)
            if isinstance(v, str) and not Path(v).exists() and (p.parent / v).exists():
                data[k] = str(p.parent / v)
    if migrate:
        raw = migrate_moved_keys(raw)
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return build_config(raw, source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(dump_config(cfg))
