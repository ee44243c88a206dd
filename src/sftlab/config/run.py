"""The whole run config: its sections, the method config chosen by method.name, and the checks that span
sections (objective vs model.task, per-task adapters, quantised base, precision)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from ..methods import MethodConfigBase, get_method, method_names
from ..strict import StrictModel
from .data import DataConfig
from .messages import _error_lines, _suggest
from .model import ModelConfig
from .perf import PerfConfig
from .train import TrainConfig


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
