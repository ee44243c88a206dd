"""The `data:` section: one training file (data.train) or a mixture of tasks (data.tasks, data.mixing)."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer, model_validator

from ..strict import StrictModel
from .paths import _user_path


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
