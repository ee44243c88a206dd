"""Small deterministic datasets written to disk, and a config builder, shared by loop and CLI tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftlab.config import build_config

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        rows.append({"instruction": f"Repeat: {w}", "input": "", "output": f"{w} {w}"})
    return rows


def messages_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"first {a}"},
                    {"role": "assistant", "content": a},
                    {"role": "user", "content": f"then {b}"},
                    {"role": "assistant", "content": b},
                ]
            }
        )
    return rows


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        w = rng.choice(["good", "great", "fine"] if pos else ["bad", "awful", "poor"])
        rows.append({"text": f"this is {w} stuff", "label": "pos" if pos else "neg"})
    return rows


def seq2seq_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"source": f"upper {w}", "target": w.upper()} for w in (rng.choice(WORDS) for _ in range(n))]


FORMAT_FOR_TASK = {
    "causal-lm": ("alpaca", alpaca_rows),
    "seq-cls": ("classification", classification_rows),
    "seq2seq": ("seq2seq", seq2seq_rows),
}


def make_config(
    tmp: Path,
    model: str = "tiny-llama",
    task: str = "causal-lm",
    fmt: str | None = None,
    rows=None,
    n: int = 32,
    **sections,
):
    """A RunConfig over a fresh dataset in tmp; `sections` are dicts merged into method/data/train."""
    fmt_default, gen = FORMAT_FOR_TASK[task]
    fmt = fmt or fmt_default
    if rows is None:
        rows = {"alpaca": alpaca_rows, "messages": messages_rows}.get(fmt, gen)(n)
    tmp.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(tmp / f"train-{fmt}.jsonl", rows)
    raw = {
        "model": {"name": model, "task": task},
        "method": {"name": "full", **sections.get("method", {})},
        "data": {"train": str(train), "format": fmt, "max_length": 128, **sections.get("data", {})},
        "train": {
            "output_dir": str(tmp / "run"),
            "max_steps": 10,
            "batch_size": 4,
            "lr": 1e-3,
            "schedule": "constant",
            "progress": False,
            "threads": 1,
            **sections.get("train", {}),
        },
    }
    return build_config(raw)
