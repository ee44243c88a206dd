"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, Weights & Biases, Trackio, any subset.

metrics.jsonl stays the record (and loss.png the picture); a tracker is a copy of it. The callback forwards every
row the run writes to metrics.jsonl (train rows as `train/<key>`, eval rows as `eval/<key>`, a multi-task run's
per-task eval rows as `eval/<task>/<key>`; numbers only, at the row's step), logs the resolved config when the run
starts and a final summary (status, steps, last losses and eval scores, tokens/s) when it ends. Only the process that
writes metrics.jsonl (rank 0) reports. Each tracker's package is imported only when `report_to` names it; a missing
one is a ConfigError naming the extra to install, raised before the first step.

Where each one writes (local/offline by default where the tracker allows it; README 'Tracking'):
- tensorboard: event files in RUN_DIR/tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`);
- mlflow: MLFLOW_TRACKING_URI (a server, `sqlite:///mlflow.db`, or a file store `file:///abs/mlruns`, which MLflow 3
  accepts with MLFLOW_ALLOW_FILE_STORE=true), experiment MLFLOW_EXPERIMENT_NAME (default sftlab);
- wandb: project WANDB_PROJECT (default sftlab), files in RUN_DIR/wandb; WANDB_MODE=offline keeps it local;
- trackio: project TRACKIO_PROJECT (default sftlab), trackio's local database (TRACKIO_DIR).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..errors import ConfigError
from .callbacks import Callback

if TYPE_CHECKING:
    from .loop import StepResult, Trainer

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
PROJECT = "sftlab"


def _need(name: str) -> Any:
    """Import a tracker's package, or a ConfigError naming the extra that installs it."""
    module = _PACKAGES[name]
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(
            f"train.report_to: {name} needs the {module!r} package, which is not installed: "
            f"pip install 'sftlab[{name}]' (or remove {name} from train.report_to)"
        ) from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the config as flat parameters (lists and None as text)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, bool | int | float | str) else json.dumps(v)
    return out


def metric_row(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as tracker metrics: numbers only, named by what they measure."""
    task = row.get("task")
    out = {}
    for k, v in row.items():
        if (
            k in ("step", "task")
            or isinstance(v, bool)
            or not isinstance(v, int | float)
            or not math.isfinite(v)
        ):
            continue
        if k.startswith("eval_"):
            out[f"eval/{task}/{k[5:]}" if task is not None else f"eval/{k[5:]}"] = float(v)
        else:
            out[f"train/{k}"] = float(v)
    return out


class TensorBoard:
    def start(self, run_dir: Path, name: str, config: dict) -> None:
        _need("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary: dict, status: str) -> None:
        self.writer.add_text("summary", "```json\n" + json.dumps(summary, indent=2) + "\n```")
        self.writer.flush()
        self.writer.close()


class MLflow:
    def start(self, run_dir: Path, name: str, config: dict) -> None:
        self.mlflow = _need("mlflow")
        self.mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT))
        self.run = self.mlflow.start_run(run_name=name)
        params = flatten(config)
        keys = list(params)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params a call
            self.mlflow.log_params({k: params[k] for k in keys[i : i + 100]})
        self.mlflow.set_tag("run_dir", str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, summary: dict, status: str) -> None:
        self.mlflow.log_dict(summary, "summary.json")
        self.mlflow.set_tag("status", status)
        done = {"completed": "FINISHED", "early-stopped": "FINISHED", "interrupted": "KILLED"}
        self.mlflow.end_run(status=done.get(status, "FAILED"))


class WandB:
    def start(self, run_dir: Path, name: str, config: dict) -> None:
        wandb = _need("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, config=config, dir=str(run_dir)
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict, status: str) -> None:
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if status in ("completed", "early-stopped") else 1)


class Trackio:
    def start(self, run_dir: Path, name: str, config: dict) -> None:
        self.trackio = _need("trackio")
        self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self, summary: dict, status: str) -> None:
        final = {
            f"final/{k}": v
            for k, v in summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if final:
            self.trackio.log(final)
        self.trackio.finish()


BACKENDS: dict[str, Callable[[], Any]] = {
    "tensorboard": TensorBoard,
    "mlflow": MLflow,
    "wandb": WandB,
    "trackio": Trackio,
}


@dataclass
class TrackingCallback(Callback):
    """Copies metrics.jsonl's rows, the config and a final summary to the `report_to` trackers (module docstring)."""

    report_to: list[str]
    backends: dict[str, Callable[[], Any]] = field(default_factory=lambda: dict(BACKENDS))  # tests pass fakes

    def on_fit_start(self, trainer: Trainer) -> None:
        self.trackers: list[Any] = []
        dist = getattr(trainer, "dist", None)
        if dist is not None and not dist.main:
            return
        cfg_path = trainer.run_dir / "config.yaml"
        config = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
        path = trainer.metrics.path
        # rows already in metrics.jsonl (a resumed run's, up to its checkpoint) were reported by the run that wrote them
        self.offset = path.stat().st_size if path.exists() else 0
        name = trainer.run_dir.resolve().name
        for n in self.report_to:
            tracker = self.backends[n]()
            try:
                tracker.start(trainer.run_dir, name, config)
            except ConfigError:
                raise
            except Exception as e:  # the tracker's own setup (a store it cannot open, a login it lacks)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ConfigError(
                    f"train.report_to: {n} could not start: {first} (see README 'Tracking' for its local setup)"
                ) from None
            self.trackers.append(tracker)

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self._forward(trainer)

    def on_fit_end(self, trainer: Trainer) -> None:
        if not getattr(self, "trackers", None):
            return
        self._forward(trainer)
        s = trainer.state
        summary = {
            "status": s.status,
            "steps": s.step,
            "total_steps": trainer.total_steps,
            "train_loss": s.last_loss,
            **{k: v for k, v in s.last_eval.items() if k != "step"},
            "tokens": s.tokens,
            "train_time_s": s.train_time,
            "tokens_per_s": s.tokens / s.train_time if s.train_time else None,
            "warnings": list(s.warnings),
        }
        for tracker in self.trackers:
            tracker.finish(summary, s.status)
        self.trackers = []

    def _forward(self, trainer: Trainer) -> None:
        """Send the rows written since the last call (whole lines only)."""
        if not getattr(self, "trackers", None):
            return
        path = trainer.metrics.path
        if not path.exists():
            return
        with open(path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].decode("utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            metrics = metric_row(row)
            if metrics and "step" in row:
                for tracker in self.trackers:
                    tracker.log(metrics, int(row["step"]))


def tracking_callbacks(report_to: list[str]) -> list[Callback]:
    """[TrackingCallback] when `train.report_to` names any tracker; each package is checked now, before training."""
    if not report_to:
        return []
    for name in report_to:
        _need(name)
    return [TrackingCallback(list(report_to))]
