"""The UI's run-directory reader: what a page shows about runs, read from the files `sftlab train` writes.

metrics.jsonl (train rows: step, loss, lr, tokens_per_s; eval rows: step, eval_loss, ...), summary.json, config.yaml
and any evaluation results beside them (eval*.json from `sftlab eval`, quickstart.json). Everything here tolerates a
run that is still being written: a half-written last line of metrics.jsonl is skipped, a missing summary is None.
No gradio here; the curves are matplotlib figures, as in loss.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SKIP_DIRS = {"checkpoints", "final", "data", ".previous-run", "__pycache__", ".git", ".venv", "node_modules"}
# top-level keys of an eval file that hold the settings it ran with, not results (quickstart.json: method, train, ...)
SETTINGS_KEYS = {"method", "train", "data", "model", "config", "settings", "max_new_tokens", "status", "run_dir",
                 "generation"}  # fmt: skip
SUMMARY_COLUMNS = ["run", "status", "model", "method", "steps", "train_loss", "eval_loss", "tokens_per_s",
                   "trainable_share", "wall_time_s"]  # fmt: skip


def is_run_dir(path: Path) -> bool:
    """A directory `sftlab train` wrote: its config.yaml plus one of the files a started run has."""
    return (path / "config.yaml").is_file() and any(
        (path / name).exists() for name in ("metrics.jsonl", "summary.json", ".sftlab-run.json", "final")
    )


def find_runs(root: str | Path, max_depth: int = 4) -> list[Path]:
    """Run directories under `root` (itself included), newest first; checkpoints/, final/ and data/ are not
    searched."""
    root = Path(root)
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if is_run_dir(d):
            found.append(d)
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS)
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return sorted(found, key=_mtime, reverse=True)


def _mtime(run: Path) -> float:
    times = [p.stat().st_mtime for p in (run / "metrics.jsonl", run / "summary.json", run / "config.yaml")
             if p.exists()]  # fmt: skip
    return max(times, default=0.0)


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, overall eval rows) of metrics.jsonl; a line being written (not JSON yet) is skipped."""
    path = Path(run) / "metrics.jsonl"
    train: list[dict] = []
    evals: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return train, evals
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        if isinstance(row.get("loss"), (int, float)):
            train.append(row)
        elif (
            isinstance(row.get("eval_loss"), (int, float)) and "task" not in row
        ):  # a multi-task run's per-task
            evals.append(row)  # rows (data.tasks) stand beside the overall one: the curve shows the overall
    return train, evals


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_summary(run: str | Path) -> dict | None:
    """summary.json, or None while the run has not written it (or when it is unreadable)."""
    return read_json(Path(run) / "summary.json")


def read_config(run: str | Path) -> dict:
    try:
        data = yaml.safe_load((Path(run) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def eval_files(run: str | Path) -> list[Path]:
    """Evaluation results kept in the run directory: eval*.json (`sftlab eval`) and quickstart.json."""
    run = Path(run)
    found = [p for p in run.glob("*.json") if p.name.startswith("eval") or p.name == "quickstart.json"]
    # `sftlab eval`'s default --out is RUN/eval/ (a multi-task run's RUN/eval/<task>/)
    found += run.glob("eval/**/eval.json")
    return sorted(found)


def flatten(data: Any, prefix: str = "", records: bool = True) -> dict[str, Any]:
    """Nested JSON -> {"a.b.c": scalar}; lists of scalars are joined, lists of objects numbered (or, with
    `records=False`, left out: per-example rows are not a metric)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}.", records))
    elif isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        for i, v in enumerate(data if records else []):
            out.update(flatten(v, f"{prefix}{i}.", records))
    elif isinstance(data, list):
        out[prefix.rstrip(".")] = ", ".join(str(x) for x in data)
    else:
        out[prefix.rstrip(".")] = data
    return out


@dataclass
class RunView:
    """What the pages show about one run."""

    path: Path
    config: dict
    summary: dict | None
    train: list[dict]
    evals: list[dict]

    @property
    def status(self) -> str:
        if self.summary is not None:
            return str(self.summary.get("status", "?"))
        return "unfinished" if self.train else "starting"  # running, stopped or crashed: no summary yet

    @property
    def last_checkpoint(self) -> int | None:
        """The newest checkpoint's step (what `--resume` starts from, if it verifies)."""
        steps = [int(p.name[5:]) for p in (self.path / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
        return max(steps, default=None)

    def row(self, root: Path | None = None) -> dict[str, Any]:
        """One line of the runs table."""
        s = self.summary or {}
        name = str(self.path.relative_to(root)) if root and self.path.is_relative_to(root) else str(self.path)
        last_train = self.train[-1] if self.train else {}
        return {
            "run": name or ".",
            "status": self.status,
            "model": short_name((self.config.get("model") or {}).get("name")),
            "method": (self.config.get("method") or {}).get("name"),
            "steps": s.get("steps", last_train.get("step")),
            "train_loss": _round(s.get("train_loss", last_train.get("loss"))),
            "eval_loss": _round(self.evals[-1]["eval_loss"]) if self.evals else None,
            "tokens_per_s": _round(s.get("tokens_per_s"), 0),
            "trainable_share": _round(s.get("trainable_share"), 4),
            "wall_time_s": _round(s.get("wall_time_s"), 1),
        }


def short_name(name: Any, width: int = 32) -> Any:
    """A model named by a long path shows as its last folder (the full name is in the run's config.yaml)."""
    if isinstance(name, str) and len(name) > width and "/" in name:
        return ".../" + name.rstrip("/").rsplit("/", 1)[-1]
    return name


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float) and math.isfinite(x):
        return round(x, digits)
    return x


def load_view(run: str | Path) -> RunView:
    run = Path(run)
    train, evals = read_metrics(run)
    return RunView(run, read_config(run), read_summary(run), train, evals)


def summaries_table(views: list[RunView], root: Path | None = None) -> list[list[Any]]:
    """Rows for SUMMARY_COLUMNS, one per run."""
    return [[v.row(root)[c] for c in SUMMARY_COLUMNS] for v in views]


def eval_table(runs: list[Path], root: Path | None = None) -> tuple[list[str], list[list[Any]]]:
    """Evaluation results side by side: (header, rows); a row per `file: metric` (every number in the file except
    settings and per-example records; `file` relative to the run, without .json), a column per run."""
    names = [str(r.relative_to(root)) if root and r.is_relative_to(root) else str(r) for r in runs]
    cells: dict[str, dict[int, Any]] = {}
    for i, run in enumerate(runs):
        for f in eval_files(run):
            data = read_json(f)
            if data is None:
                continue
            data = {k: v for k, v in data.items() if k not in SETTINGS_KEYS}
            for key, value in flatten(data, records=False).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):  # metrics, not settings
                    name = f.relative_to(run).with_suffix("").as_posix()  # eval, eval/eval, eval/sst2/eval
                    cells.setdefault(f"{name}: {key}", {})[i] = _round(value)
    rows = [[key, *(by_run.get(i) for i in range(len(runs)))] for key, by_run in cells.items()]
    return ["metric", *names], rows


def curves_figure(views: list[RunView], root: Path | None = None, title: str = "loss"):
    """Train loss (lines) and eval loss (dashed, markers) per step for each run, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for v in views:
        name = v.row(root)["run"]
        if v.train:
            line = ax.plot([r["step"] for r in v.train], [r["loss"] for r in v.train], label=f"{name} train")[
                0
            ]
            color = line.get_color()
        else:
            color = None
        if v.evals:
            ax.plot([r["step"] for r in v.evals], [r["eval_loss"] for r in v.evals], "o--", color=color,
                    label=f"{name} eval")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any(v.train or v.evals for v in views):
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)
    return fig
