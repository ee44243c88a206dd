"""`sftlab pipeline PIPE.yaml`: runs in order, each stage starting from the model the one before it trained.

The survey's recipe is the example (examples/pipeline/): self-supervised on domain text, then supervised on the
last layers only or with a PEFT method. PIPE.yaml:

    output_dir: runs/pipe              # the pipeline directory (default: runs/<PIPE file stem>)
    stages:
      - name: domain                   # optional (stage1, stage2, ...): letters, digits, _ and -
        config: configs/x.yaml         # optional: a run config file; the stage's other keys override it
        model: {name: tiny-bert}
        train: {objective: mlm, max_steps: 200}
      - name: sft
        model: {init_from: previous, task: seq-cls}
        ...

Each stage is a normal run config (model / method / data / train / perf). `model.init_from: previous` makes its
model the previous stage's output, as `model.name`: that stage's final/ for full/freeze, else (LoRA) the merged
model, written once to PIPE_DIR/NN-name.merged. The pipeline sets each stage's `train.output_dir` to
PIPE_DIR/NN-name, so a stage is an ordinary run directory (`sftlab eval`, `generate`, `merge` work on it), and a
stage equals running its config by hand with `model.name` pointing at that directory.

Rerunning the command continues: a finished stage (final/ written) is never redone; the first unfinished one
resumes from its newest checkpoint exactly (`--resume-or-start`), or starts when it has none. A stage's run
directory must hold a run of the stage's current config, and a stage started from a previous stage's output must
find that output unchanged (its weights' sha256 is recorded): otherwise the pipeline stops and says which stage to
remove, rather than mixing results of two configs. PIPE_DIR/pipeline.json records the stages, their status,
results and where each started from.

A stage with a `self_train:` section is a self-training stage (selftrain/run.py): its run config trains the teacher
and the students, its rounds go under PIPE_DIR/NN-name, and the next stage starts from its last student.

Seams left for later: keeping a LoRA stage's adapter and stacking the next stage's on it (today it is merged);
per-stage `--overwrite`.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    RunConfig,
    _suggest,
    build_config,
    deep_merge,
    load_yaml,
    require_remote_code_flag,
)
from .errors import ConfigError, DataError
from .files import recorded, weights_digest, write_json
from .merged import merge_run, mergeable
from .methods import get_method
from .recipe import train
from .rundir import config_changes, describe_changes
from .selftrain import SECTION, SelfTrainConfig, SelfTraining, run_self_train, split_config
from .selftrain import check as check_self_train

PIPELINE_FILE = "pipeline.json"
PREVIOUS = "previous"
_TOP_KEYS = ("output_dir", "stages")
_STAGE_KEYS = ("name", "config", "model", "method", "data", "train", "perf", SECTION)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_RESULT_KEYS = ("status", "error", "steps", "train_loss", "eval_loss", "eval_perplexity", "eval_accuracy",
                "tokens_per_s", "train_time_s", "wall_time_s")  # fmt: skip


@dataclass
class Stage:
    index: int
    name: str
    cfg: RunConfig
    init_from: str | None  # "previous" or None
    self_train: SelfTrainConfig | None = None  # a self-training stage: its rounds go under run_dir

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def job(self) -> SelfTraining | None:
        return SelfTraining(self.cfg, self.self_train, self.label) if self.self_train else None

    @property
    def model_run(self) -> Path:
        """The run whose model the stage ends with: its own, or a self-training stage's last student."""
        return self.job.last_run() if self.job else self.run_dir

    @property
    def label(self) -> str:
        return f"stages[{self.index}] ({self.name})"

    def finished(self) -> bool:
        return (self.model_run / "final" / "sftlab.json").is_file()

    def output(self) -> Path:
        """The model directory the next stage starts from: final/ (a full model) or the merged one."""
        if get_method(self.cfg.method.name).saves_full_model:
            return self.model_run / "final"
        return self.run_dir.parent / f"{self.run_dir.name}.merged"


@dataclass
class Pipeline:
    source: str
    output_dir: Path
    stages: list[Stage]


# -- reading PIPE.yaml ---------------------------------------------------------------------------------------


def load_pipeline(
    path: str | Path, output_dir: str | None = None, trust_remote_code: bool = False
) -> Pipeline:
    """Read and check PIPE.yaml and every stage's config (each a RunConfig) before anything runs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file {str(p)!r} does not exist")
    raw = load_yaml(p.read_text(), str(p))
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping with `stages:` (and `output_dir:`)")
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(
                f"{p}: {key}: unknown key{_suggest(str(key), list(_TOP_KEYS))}; allowed: output_dir, stages"
            )
    out = output_dir or raw.get("output_dir") or f"runs/{p.stem}"
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"{p}: output_dir: expected a directory path (got {out!r})")
    root = Path(os.path.expanduser(out))
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{p}: stages: expected a non-empty list of stages (each a run config)")
    stages: list[Stage] = []
    seen: dict[str, int] = {}
    for i, s in enumerate(stages_raw):
        stage = _stage(p, i, s, root, stages, trust_remote_code)
        if stage.name in seen:
            raise ConfigError(f"{p}: stages[{i}].name: {stage.name!r} is taken by stages[{seen[stage.name]}]")
        seen[stage.name] = i
        stages.append(stage)
    return Pipeline(str(p), root, stages)


def _stage(p: Path, i: int, s: Any, root: Path, before: list[Stage], trust_remote_code: bool) -> Stage:
    where = f"{p}: stages[{i}]"
    if not isinstance(s, dict):
        raise ConfigError(f"{where}: expected a mapping (a run config, optionally with name and config)")
    for key in s:
        if key not in _STAGE_KEYS:
            raise ConfigError(
                f"{where}: {key}: unknown key{_suggest(str(key), list(_STAGE_KEYS))}; allowed: {', '.join(_STAGE_KEYS)}"
            )
    name = s.get("name", f"stage{i + 1}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name: expected letters, digits, _ and - (got {name!r})")
    base: dict = {}
    if s.get("config") is not None:
        cp = Path(os.path.expanduser(str(s["config"])))
        if not cp.is_file():
            raise ConfigError(f"{where}.config: {str(cp)!r} does not exist")
        base = load_yaml(cp.read_text(), str(cp)) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{cp}: top level must be a mapping with model/method/data/train")
    extra = {k: v for k, v in s.items() if k not in ("name", "config")}
    for section in ("model", "train"):
        if section in extra and not isinstance(extra[section], dict):
            raise ConfigError(f"{where}.{section}: expected a mapping (got {extra[section]!r})")
    model = dict(extra.get("model") or {})
    init_from = model.pop("init_from", None)
    if init_from is not None and init_from != PREVIOUS:
        raise ConfigError(
            f"{where}.model.init_from: {init_from!r}: expected `previous` (the previous stage's model); a model "
            "directory goes in model.name"
        )
    if init_from == PREVIOUS:
        if i == 0:
            raise ConfigError(f"{where}.model.init_from: previous: the first stage has no previous stage")
        if "name" in model:
            raise ConfigError(
                f"{where}.model: name and init_from: previous both say where the model comes from; keep one"
            )
        prev = before[-1]
        if not get_method(prev.cfg.method.name).saves_full_model and not mergeable(prev.cfg.method.name):
            raise ConfigError(
                f"{where}.model.init_from: previous: stage {prev.name!r} trains method {prev.cfg.method.name}, which "
                "cannot be merged into the model's weights, so there is no model to start from; use full, freeze "
                "or lora there"
            )
        model["name"] = str(prev.output())
    if "output_dir" in (extra.get("train") or {}):
        raise ConfigError(
            f"{where}.train.output_dir: set by the pipeline ({root / f'NN-{name}'}); drop it (output_dir: at the top "
            "of the pipeline file moves the whole pipeline)"
        )
    extra["model"] = model
    run_dir = root / f"{i + 1:02d}-{name}"
    merged = deep_merge(base, {**extra, "train": {**(extra.get("train") or {}), "output_dir": str(run_dir)}})
    source = f"{where} ({name})"
    if SECTION in merged:  # a self-training stage: the run config is its teacher's and students'
        cfg, st = split_config(merged, source, trust_remote_code)
        check_self_train(SelfTraining(cfg, st, source))
        return Stage(i, name, cfg, init_from, st)
    cfg = require_remote_code_flag(build_config(merged, source), trust_remote_code, source)
    _check_paths(cfg, source)
    return Stage(i, name, cfg, init_from)


def _check_paths(cfg: RunConfig, source: str) -> None:
    """A stage's data files exist, checked before the first stage trains (not when its turn comes)."""
    d = cfg.data
    places = [("data.train", d.train), ("data.eval", d.eval)]
    places += [
        (f"data.tasks[{i}].{k}", getattr(t, k))
        for i, t in enumerate(d.tasks or [])
        for k in ("train", "eval")
    ]
    for key, value in places:
        if value is not None and not Path(value).exists():
            raise DataError(f"{source}: {key}: {value}: data file or directory does not exist")


# -- pipeline.json -------------------------------------------------------------------------------------------


def _read_record(root: Path) -> dict:
    path = root / PIPELINE_FILE
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(
            f"{path}: unreadable ({e}); remove it to rebuild it from the stages' run directories"
        ) from None
    return rec if isinstance(rec, dict) else {}


def _write_record(root: Path, record: dict) -> None:
    write_json(root / PIPELINE_FILE, record)


def _stage_row(stage: Stage, old: dict | None) -> dict:
    c = stage.cfg
    row = {
        "name": stage.name,
        "run_dir": str(stage.run_dir),
        "objective": "self-train" if stage.self_train else c.train.objective,
        "task": c.model.task,
        "method": c.method.name,
        "model": c.model.name,
        "init_from": stage.init_from,
        "status": "pending",
        "result": None,
        "output": None,
        "init_digest": None,
        "output_digest": None,
    }
    if old and old.get("name") == stage.name and old.get("run_dir") == str(stage.run_dir):
        row.update(
            {k: old[k] for k in ("status", "result", "output", "init_digest", "output_digest") if k in old}
        )
    return row


# -- running -------------------------------------------------------------------------------------------------


def _check_run_dir(stage: Stage) -> None:
    """A stage's existing run directory must hold a run of this very config (resume or reuse would mix two)."""
    diff = config_changes(stage.run_dir, stage.cfg)
    if diff:
        raise ConfigError(
            f"{stage.label}: {stage.run_dir} holds a run of another config ({describe_changes(diff)}); put the stage's "
            f"config back, or remove {stage.run_dir} to redo the stage (and the stages after it)"
        )


def _check_init(stage: Stage, row: dict, prev_row: dict | None) -> None:
    """A stage started from the previous stage's output must find that output as it was (not retrained since)."""
    if stage.init_from != PREVIOUS or prev_row is None or not row.get("init_digest"):
        return
    if not (stage.run_dir / "config.yaml").is_file():
        return
    if prev_row.get("output_digest") != row["init_digest"]:
        raise ConfigError(
            f"{stage.label}: its run in {stage.run_dir} started from another output of stage {prev_row['name']!r} "
            f"(that stage was trained again since); remove {stage.run_dir} to redo this stage from the new one"
        )


def run_pipeline(pipe: Pipeline, log=print) -> dict:
    """Run every unfinished stage in order; returns (and writes) the pipeline record. A stage that fails, diverges
    or is interrupted stops the pipeline (its record says so) and a rerun continues there."""
    old = _read_record(pipe.output_dir)
    old_rows = old.get("stages") if isinstance(old.get("stages"), list) else []
    rows = [_stage_row(s, old_rows[i] if i < len(old_rows) else None) for i, s in enumerate(pipe.stages)]
    record = {
        "pipeline": pipe.source,
        "output_dir": str(pipe.output_dir),
        "status": "running",
        "stages": rows,
    }
    for stage in pipe.stages:
        _check_run_dir(stage)
    _write_record(pipe.output_dir, record)
    with recorded(record, lambda r: _write_record(pipe.output_dir, r)):
        record["status"] = _run_stages(pipe, rows, record, log)
    return record


def _run_stages(pipe: Pipeline, rows: list[dict], record: dict, log) -> str:
    """The stages in order, each kept (finished), resumed or started; the pipeline's status."""
    for stage, row in zip(pipe.stages, rows):
        prev_row = rows[stage.index - 1] if stage.index else None
        _check_init(stage, row, prev_row)
        trained = False
        where = f"pipeline: stage {stage.index + 1}/{len(rows)} {stage.name}"
        if stage.finished():
            log(f"{where}: finished in {stage.run_dir}, kept")
            if row["status"] not in ("completed", "early-stopped"):
                row["status"] = _summary(stage).get("status", "completed")
                row["result"] = _result(_summary(stage))
        else:
            log(f"{where} in {stage.run_dir}")
            if stage.init_from == PREVIOUS and prev_row is not None:
                row["init_digest"] = prev_row["output_digest"]
            row["status"] = "running"
            _write_record(pipe.output_dir, record)
            summary = _train(stage, row, log)
            row["status"], row["result"] = summary["status"], _result(summary)
            trained = True
            if summary["status"] not in ("completed", "early-stopped"):
                log(f"pipeline: stage {stage.name} ended {summary['status']}; stopped (rerun to continue)")
                return "failed"
        if _feeds_next(pipe, stage):
            _make_output(stage, row, trained, log)
        _write_record(pipe.output_dir, record)
    return "completed"


def _train(stage: Stage, row: dict, log) -> dict:
    """The stage's run, resumed when it has a checkpoint; an interrupt or error is noted in its row and re-raised."""
    t0 = time.perf_counter()
    try:
        if stage.job:  # its record says how far each round got; the stage reports the last student's result
            run_self_train(stage.job, log)
            return json.loads((stage.run_dir / "summary.json").read_text())
        return train(stage.cfg, resume_or_start=True, log=log)
    except KeyboardInterrupt:
        row["status"] = "interrupted"
        raise
    except Exception as e:
        row["status"] = "failed"
        row["result"] = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "wall_time_s": time.perf_counter() - t0,
        }
        raise


def _feeds_next(pipe: Pipeline, stage: Stage) -> bool:
    nxt = stage.index + 1
    return nxt < len(pipe.stages) and pipe.stages[nxt].init_from == PREVIOUS


def _make_output(stage: Stage, row: dict, trained: bool, log) -> None:
    """The model the next stage starts from: final/ itself, or the LoRA run merged (once; again if retrained)."""
    out = stage.output()
    if out != stage.model_run / "final" and (trained or not out.is_dir()):
        log(f"pipeline: merging {stage.name}'s {stage.cfg.method.name} into the weights: {out}")
        merge_run(stage.model_run, out, force=True, trust_remote_code=stage.cfg.model.trust_remote_code)
    row["output"] = str(out)
    row["output_digest"] = weights_digest(out)


def _summary(stage: Stage) -> dict:
    path = stage.run_dir / "summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _result(summary: dict) -> dict:
    return {k: summary[k] for k in _RESULT_KEYS if k in summary}
