"""metrics.jsonl (one row per logged step or eval) and loss.png."""

from __future__ import annotations

import json
from pathlib import Path

from ..files import read_jsonl


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            # Drop rows logged after the checkpoint we resume from: they will be logged again.
            rows = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif path.exists():
            path.unlink()

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The logged rows; a broken line is a RunDirError naming metrics.jsonl:line (a last line cut short by a
        kill mid-write is dropped: it was logged after the newest checkpoint, so a resume logs it again)."""
        if not path.exists():
            return []
        return read_jsonl(path, "metrics log", drop_cut_tail=True)


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    overall = [r for r in rows if "task" not in r]  # a multi-task run's per-task eval rows go to tasks.png
    evals = [(r["step"], r["eval_loss"]) for r in overall if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
