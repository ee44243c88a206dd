"""E2E NLG with SmolLM2 (issue 22): BLEU of the base model and of a LoRA run on held-out meaning representations.

Data: ../shared/data/e2e/valid.txt (4,672 `MR||reference` lines, 547 distinct MRs), split by MR with a seeded
shuffle: the first 80 MRs are the test set (every reference of each: `sftlab eval` groups them by prompt), 1,200 pairs
drawn from the other MRs train. One alpaca record per pair: the instruction asks for a sentence, the input is the MR.

Model: SmolLM2-135M-Instruct (the quickstart's cached demo model); LoRA r16 on every linear layer, one epoch.

    flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.e2e_eval            # data + train + eval
    .venv/bin/python -m benchmarks.e2e_eval --prepare-only                           # just the data and config

The eval step is one line: `sftlab eval runs/e2e-lora --data runs/e2e-lora-data/test.jsonl --metrics bleu,exact
--base`; it prints the before/after table and writes eval.json and the predictions under runs/e2e-lora/eval/.
Heavy: take the benchmark lock.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT.parent / "shared" / "data" / "e2e" / "valid.txt"
INSTRUCTION = "Write one sentence describing this restaurant from its attributes."


def split(n_test_mrs: int, n_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train pairs, test pairs) as alpaca records; no MR is on both sides."""
    by_mr: dict[str, list[str]] = {}
    for line in E2E.read_text(encoding="utf-8").splitlines():
        if "||" in line:
            mr, ref = line.split("||", 1)
            by_mr.setdefault(mr.strip(), []).append(ref.strip())
    mrs = sorted(by_mr)
    rng = random.Random(seed)
    rng.shuffle(mrs)
    test_mrs, train_mrs = mrs[:n_test_mrs], mrs[n_test_mrs:]
    rec = lambda mr, ref: {"instruction": INSTRUCTION, "input": mr, "output": ref}  # noqa: E731
    test = [rec(mr, ref) for mr in test_mrs for ref in by_mr[mr]]
    pool = [rec(mr, ref) for mr in train_mrs for ref in by_mr[mr]]
    rng.shuffle(pool)
    return pool[:n_train], test


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/e2e-lora")
    ap.add_argument("--test-mrs", type=int, default=80)
    ap.add_argument("--train-pairs", type=int, default=1200)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()

    data = Path(f"{args.out}-data")
    data.mkdir(parents=True, exist_ok=True)
    train, test = split(args.test_mrs, args.train_pairs, args.seed)
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": {"name": "smollm2-135m-instruct", "task": "causal-lm"},
        "method": {"name": "lora", "r": 16, "alpha": 16.0, "target_modules": "all-linear"},
        "data": {"train": str(data / "train.jsonl"), "format": "alpaca", "max_length": 256},
        "train": {
            "output_dir": args.out,
            "epochs": args.epochs,
            "batch_size": 8,
            "group_by_length": False,
            "lr": 1.0e-3,
            "schedule": "cosine",
            "warmup_steps": 5,
            "seed": args.seed,
        },
    }
    (data / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{len(train)} train pairs, {len(test)} test pairs over {args.test_mrs} MRs -> {data}")
    if args.prepare_only:
        return 0
    sftlab = str(Path(sys.executable).parent / "sftlab")
    subprocess.run([sftlab, "train", str(data / "config.yaml"), "--overwrite"], check=True)
    test = str(data / "test.jsonl")
    subprocess.run(
        [sftlab, "eval", args.out, "--data", test, "--metrics", "bleu,exact", "--base", "--batch-size", "16"],
        check=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
