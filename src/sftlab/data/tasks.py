"""Multi-task data (`data.tasks`): each task read and encoded on its own, then tagged and joined for the mixture.

Each task goes through the single-task path (`load.load_data`) with its own files, format, columns, template,
system prompt and max_length; its examples are tagged with the task's index (`TASK_KEY`) and all tasks' examples
are joined into one list, task 0's first, which the mixture sampler (`mixture.py`) indexes. Errors name the task,
and (from the readers) the file and line.

On a seq-cls model every task is a classification task with its own label set (`label_names`, else the sorted
labels seen), for its own head (methods/task_heads.py). Text tasks (causal-lm, seq2seq) may mix any text formats;
a `format: classification` task on a text model is classification as text: each record becomes a one-turn chat,
the user turn its text (and text_pair), the assistant turn its label's name (`label_names[label]` when labels are
indices, else the label itself), with the task's `system_prompt` as the instruction (on an encoder-decoder it is
joined in front of the source).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .batching import TASK_KEY
from .encode import EncodedData
from .formats import Chat, Labeled, Turn, parse_record
from .load import load_data
from .mixture import Mixture, mixture_rates
from .readers import DataError, RawRecord, short

log = logging.getLogger(__name__)

TEXT_TASKS = ("causal-lm", "seq2seq")


@dataclass
class TaskSet(EncodedData):
    """All tasks' examples in one list (task 0's first, each tagged with TASK_KEY), plus each task's own data.

    `parts[i]` is task i's EncodedData (None: that task has no eval set); `mixture` is set on the train side.
    `label_names` stays None: on a seq-cls model each task has its own head and label set (`task_labels`)."""

    names: list[str] = field(default_factory=list)
    parts: list[EncodedData | None] = field(default_factory=list)
    mixture: Mixture | None = None

    @property
    def task_labels(self) -> list[list[str] | None]:
        """Each task's label names (seq-cls: its head's classes, in output order; None for a text task)."""
        return [p.label_names if p is not None else None for p in self.parts]


def task_data_config(data_cfg: Any, task: Any) -> Any:
    """The single-task `data:` config of one task: its own keys (resolved against `data:` by config/data.py)."""
    keys = [k for k in type(task).model_fields if k in type(data_cfg).model_fields and k != "tasks"]
    return data_cfg.model_copy(update={**{k: getattr(task, k) for k in keys}, "tasks": None})


def label_text(rec: Labeled, label_names: list[str] | None, where_names: str) -> str:
    """A class label as the text to generate: its name when labels are indices into `label_names`."""
    key = str(rec.label)
    if not label_names:
        return key
    if key in label_names:
        return key
    if key.lstrip("-").isdigit() and 0 <= int(key) < len(label_names):
        return label_names[int(key)]
    raise DataError(
        f"{rec.where}: label: expected one of {', '.join(label_names)} ({where_names}) or an index into them "
        f"(got {short(rec.label)})"
    )


def labels_as_chats(cfg: Any, where_names: str) -> Callable[[list[RawRecord]], list[Chat]]:
    """Classification records -> one-turn chats answering with the label's name (classification as text)."""

    def convert(raws: list[RawRecord]) -> list[Chat]:
        out = []
        for raw in raws:
            rec = parse_record(raw, "classification")  # validates text/label, naming path:line
            prompt = rec.text if rec.text_pair is None else f"{rec.text}\n\n{rec.text_pair}"
            turns = [Turn("system", cfg.system_prompt, False)] if cfg.system_prompt else []
            turns += [
                Turn("user", prompt, False),
                Turn("assistant", label_text(rec, cfg.label_names, where_names), True),
            ]
            out.append(Chat(rec.where, turns))
        return out

    return convert


def load_task(
    data_cfg: Any, task_cfg: Any, index: int, tokenizer: Any, model_task: str, seed: int
) -> tuple[EncodedData, EncodedData | None]:
    """One task's (train, eval or None) through the single-task loader; a DataError names the task."""
    cfg = task_data_config(data_cfg, task_cfg)
    label = f"data.tasks[{index}] ({task_cfg.name})"
    convert = None
    if cfg.format == "classification" and model_task in TEXT_TASKS:
        convert = labels_as_chats(cfg, f"{label}.label_names")
        cfg = cfg.model_copy(update={"format": "messages"})  # what the records are once converted
    try:
        return load_data(cfg, tokenizer, model_task, seed, convert=convert)
    except DataError as e:
        raise DataError(f"{label}: {e}") from None


def _join(parts: list[EncodedData | None], names: list[str]) -> TaskSet | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    examples: list[dict] = []
    for i, p in enumerate(parts):
        for ex in p.examples if p is not None else []:
            ex[TASK_KEY] = i
            examples.append(ex)
    stats: dict[str, int] = {}
    for p in present:
        for k, v in p.stats.items():
            if isinstance(v, int):
                stats[k] = stats.get(k, 0) + v
    return TaskSet(examples, stats, None, list(names), list(parts))


def load_tasks(
    data_cfg: Any, tokenizer: Any, model_task: str, seed: int = 0, log_line: Callable[[str], None] = print
) -> tuple[TaskSet, TaskSet | None]:
    """(train, eval or None) of every task in `data_cfg.tasks`, joined; the train side carries the mixture."""
    tasks = data_cfg.tasks
    names = [t.name for t in tasks]
    trains: list[EncodedData | None] = []
    evals: list[EncodedData | None] = []
    for i, t in enumerate(tasks):
        tr, ev = load_task(data_cfg, t, i, tokenizer, model_task, seed)
        trains.append(tr)
        evals.append(ev)
        st = tr.stats
        log_line(
            f"task {t.name}: {st.get('examples')} train examples, {st.get('supervised_tokens')} supervised tokens, "
            f"{st.get('truncated', 0)} truncated to {t.max_length}, {st.get('dropped', 0)} dropped"
            + (f"; {len(ev.examples)} eval examples" if ev else "")
        )
    m = data_cfg.mixing
    sizes = [len(p.examples) for p in trains]
    rates = mixture_rates(sizes, m.strategy, m.cap, m.temperature, [t.weight for t in tasks])
    train = _join(trains, names)
    train.mixture = Mixture(
        tuple(names), tuple(sizes), tuple(rates), tuple(t.loss_weight for t in tasks), m.strategy
    )
    return train, _join(evals, names)


def longest_max_length(data_cfg: Any) -> tuple[int, str]:
    """The largest max_length a run encodes to, and its config key (a task's, or data.max_length)."""
    if not data_cfg.tasks:
        return data_cfg.max_length, "data.max_length"
    i = max(range(len(data_cfg.tasks)), key=lambda j: data_cfg.tasks[j].max_length)
    return data_cfg.tasks[i].max_length, f"data.tasks[{i}].max_length"


def task_ids(examples: list[dict], packed: bool) -> torch.Tensor:
    """Each row's task (B,) for a padded batch; each token's (1, N) for a packed row (examples of several tasks)."""
    if packed:
        ids = [ex[TASK_KEY] for ex in examples for _ in ex["input_ids"]]
        return torch.tensor([ids], dtype=torch.long)  # (1, N)
    return torch.tensor([ex[TASK_KEY] for ex in examples], dtype=torch.long)  # (B,)
