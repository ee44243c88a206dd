"""The run directory: its layout, the atomic `final/` write, and reloading a trained run for use.

run_dir/config.yaml      resolved config
run_dir/metrics.jsonl    one row per logged step / eval
run_dir/loss.png         train and eval loss vs step
run_dir/checkpoints/step-N/
run_dir/final/           adapter (PEFT layout where PEFT has the method) or full HF model, plus tokenizer
run_dir/final/sftlab.json  method, task, base model, label names
run_dir/final/tasks.json   data.tasks: each task's name, kind, label names and folder (final/<task>/: a one-task
                           final/ of its own head/adapter; "." when one model serves every task)
run_dir/summary.json
run_dir/.sftlab-run.json  the entries sftlab wrote: what --overwrite may delete (rundir.py)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn

from . import hub
from .config import RunConfig, ignore_saved_remote_code, load_config
from .errors import RunDirError
from .files import check_safetensors, read_json, read_json_object
from .methods import MethodContext, MethodSpec, get_method, multitask
from .train.device import usable_device

RUN_INFO = "sftlab.json"
TASKS_INDEX = "tasks.json"  # a multi-task run's tasks: name, kind, format, label names, path under final/


def method_of(cfg: RunConfig, tokenizer) -> tuple[MethodSpec, MethodContext]:
    """The run's method and what it may know of the run: the one place both are made."""
    ctx = MethodContext(task=cfg.model.task, tokenizer=tokenizer, base_model_name=cfg.model.name)
    return get_method(cfg.method.name), ctx


def save_final(
    model: nn.Module, tokenizer, cfg: RunConfig, run_dir: Path, label_names: list[str] | None
) -> Path:
    """Write final/ into a temp dir and rename, so a crash never leaves a half-written final model. A multi-task run
    also writes final/tasks.json, and with a head or adapter per task one directory per task (`final/<task>/`)."""
    final, tmp = run_dir / "final", run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec, ctx = method_of(cfg, tokenizer)
    info = {
        "method": cfg.method.name,
        "task": cfg.model.task,
        "base_model": cfg.model.name,
        "label_names": label_names,
    }
    rec = multitask.tasks_of(model)
    if rec is not None and multitask.routes(model):  # each task its own head or adapter: a directory each
        for i, name in enumerate(rec.names):
            multitask.save_task(model, spec, cfg.method, ctx, tmp / name, name)
            _finish(tmp / name, tokenizer, {**info, "label_names": rec.label_names[i], "run_task": name})
        (tmp / RUN_INFO).write_text(json.dumps({**info, "label_names": None, "tasks": TASKS_INDEX}, indent=2))
        _write_index(tmp, cfg, rec.label_names, rec.per_task, per_dir=True)
    else:
        spec.save(model, cfg.method, tmp, ctx)
        _finish(tmp, tokenizer, info)
        if cfg.data.tasks is not None:  # one model serves every task
            _write_index(tmp, cfg, [None] * len(cfg.data.tasks), False, per_dir=False)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _finish(out: Path, tokenizer, info: dict) -> None:
    tokenizer.save_pretrained(out)
    (out / RUN_INFO).write_text(json.dumps(info, indent=2))


def _write_index(out: Path, cfg: RunConfig, labels: list, per_task: bool, per_dir: bool) -> None:
    tasks = [
        {
            "name": t.name,
            "kind": cfg.model.task,
            "format": t.format,
            "label_names": labels[i],
            "path": t.name if per_dir else ".",
        }
        for i, t in enumerate(cfg.data.tasks)
    ]
    index = {"format": "sftlab-tasks", "format_version": 1, "method": cfg.method.name, "per_task": per_task,
             "tasks": tasks}  # fmt: skip
    (out / TASKS_INDEX).write_text(json.dumps(index, indent=2))


def task_dir(final: Path, task: str) -> Path:
    """final/ of one task of a multi-task run (final/<task>/, or final/ itself when one model serves every task);
    a RunDirError naming the tasks when there is no such task."""
    index = read_json_object(final / TASKS_INDEX, "task index")
    entries = index.get("tasks")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
        raise RunDirError(f"{final / TASKS_INDEX}: tasks: expected a list of {{name, path, ...}} objects")
    entry = next((e for e in entries if e["name"] == task), None)
    if entry is None:
        names = ", ".join(str(e["name"]) for e in entries)
        raise RunDirError(f"{final / TASKS_INDEX}: no task {task!r} in this run; its tasks: {names}")
    path = entry.get("path")
    if not isinstance(path, str) or Path(path).is_absolute() or ".." in Path(path).parts:
        raise RunDirError(
            f"{final / TASKS_INDEX}: task {task!r}: path: expected a folder inside final/ (got {path!r})"
        )
    return final / path


def load_run(
    run_dir: str | Path, which: str = "final", trust_remote_code: bool = False, task: str | None = None
) -> tuple[nn.Module, object, RunConfig]:
    """(model, tokenizer, config) of a trained run, ready for eval or generation. The model's own code (auto_map)
    runs only with `trust_remote_code` (the user's --trust-remote-code); the run's config.yaml cannot turn it on.
    A multi-task run loads one task (`task`): its head and adapter (final/<task>/), as a one-task model."""
    run = Path(run_dir)
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run}: not a run directory (no config.yaml)")
    cfg = ignore_saved_remote_code(load_config(cfg_path, migrate=True), trust_remote_code, str(cfg_path))
    final = run / which
    info_path = final / RUN_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{final}: no trained model here (did the run finish? try --resume)")
    info = read_json_object(info_path, "run info")
    if task is not None:
        if not (final / TASKS_INDEX).is_file():
            raise RunDirError(
                f"{run}: a task ({task!r}) was asked for, but this run was not trained on data.tasks"
            )
        final = task_dir(final, task)
        info_path = final / RUN_INFO
        info = read_json_object(info_path, "run info")
    elif "tasks" in info:
        names = ", ".join(t.name for t in cfg.data.tasks or [])
        raise RunDirError(
            f"{run}: trained one head or adapter per task ({names}); say which to load: `sftlab eval/generate RUN "
            "--task NAME`, runs.load_run(RUN, task=NAME), or the folder final/NAME"
        )
    labels = info.get("label_names")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise RunDirError(
            f"{info_path}: label_names: expected a list of strings or null (got {labels!r:.60})"
        )
    num_labels = len(labels) if labels else None
    check_files(final)
    m = cfg.model
    tokenizer = hub.load_tokenizer(str(final), m.trust_remote_code)
    spec, ctx = method_of(cfg, tokenizer)
    source = str(final) if spec.saves_full_model else m.name
    model, _ = hub.load_model(
        source,
        m.task,
        m.dtype,
        num_labels,
        m.trust_remote_code,
        m.attn_implementation,
        tokenizer=tokenizer,
        quant=m.quant_spec(),
    )
    if not spec.saves_full_model:
        spec.apply(model, cfg.method, ctx)
        spec.load(model, cfg.method, final, ctx)
    if labels:  # a rebuilt base names its classes LABEL_0..; the run's names say what each output means
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.to(usable_device(cfg.train.device))  # eval/generate where the run trained, or here on the CPU
    model.eval()
    return model, tokenizer, cfg


def check_files(final: Path) -> None:
    """Every JSON and safetensors file in final/ parses (safetensors: its header), so a truncated or garbled one is
    a RunDirError naming it, before transformers or a method's loader trips over it."""
    for f in sorted(final.glob("*.json")):
        read_json(f, "JSON file")
    for f in sorted(final.glob("*.safetensors")):
        check_safetensors(f)
