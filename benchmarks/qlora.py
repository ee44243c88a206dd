"""QLoRA evidence (issue 21): NF4-LoRA vs fp32-LoRA, each variant in its own process (its peak RSS is its own).

  flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.qlora quickstart   # SmolLM2, the quickstart task
  flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.qlora b1 --pairs 2 # B1 workload (58M Llama)

quickstart: the quickstart's recipe (LoRA r=16 on every linear, 400 chats, one epoch) through `recipe.train`, once
with `model.quantize: null` and once with `nf4`; then the saved adapter is reloaded (`runs.load_run`, which
rebuilds the NF4 base) and scored on the 100 held-out prompts (exact match, fields). Reports tokens/s, peak RSS,
and the base's weight bytes (quantised linears vs what they were; embeddings and norms stay fp32).
b1: `benchmarks.ours --workload B1` with the base quantised to NF4 right after it is built, alternating with the
plain fp32 run, `--pairs` times. Prints `RESULT {json}` lines and appends them to benchmarks/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _child_quickstart(variant: str, out: Path, threads: int, steps: int | None, n_eval: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from sftlab.hub import DEMO_MODEL, load_tokenizer
    from sftlab.quant import weight_memory
    from sftlab.quickstart.pipeline import (
        QuickstartOptions,
        build_run_config,
        max_new_tokens_for,
        measure,
    )
    from sftlab.quickstart.task import make_splits, write_jsonl
    from sftlab.recipe import train
    from sftlab.runs import load_run

    run_dir = out / variant
    train_recs, eval_recs = make_splits(400, 100, seed=0)
    eval_recs = eval_recs[:n_eval]
    write_jsonl(train_recs, run_dir / "data" / "train.jsonl")
    cfg = build_run_config(
        DEMO_MODEL, run_dir, QuickstartOptions(progress=False, threads=threads, steps=steps)
    )
    if variant == "nf4":
        cfg.model.quantize = "nf4"
    summary = train(cfg, overwrite=True, log=lambda *_: None)
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tuned, tok, _ = load_run(run_dir)
    mem = weight_memory(tuned)
    after = measure(tuned, tok, cfg, eval_recs, max_new_tokens_for(load_tokenizer(DEMO_MODEL), eval_recs))
    base_bytes = (
        mem["quantized_weight_bytes"]
        + mem["other_bytes"]
        - sum(p.numel() * p.element_size() for n, p in tuned.named_parameters() if "lora_" in n)
    )
    return {
        "bench": "qlora-quickstart", "variant": variant, "exact": after.exact, "fields": after.fields,
        "steps": summary["steps"], "train_loss": summary["train_loss"], "tokens_per_s": summary["tokens_per_s"],
        "train_time_s": summary["train_time_s"], "eval_s": after.seconds,
        "peak_rss_train_mb": round(rss_train, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "linear_weight_bytes": mem["quantized_weight_bytes"] if variant == "nf4" else None,
        "base_weight_bytes": base_bytes, "quantized_base": summary.get("quantized_base"), "threads": threads,
    }  # fmt: skip


def _child_b1(variant: str, steps: int, warmup: int, threads: int) -> int:
    """benchmarks.ours' B1 run, with the freshly built base quantised to NF4 first (variant nf4)."""
    from . import ours, workloads

    if variant == "nf4":
        from sftlab.quant import QuantSpec, quantize_model

        build = workloads.build_model

        def build_nf4(*a, **k):
            model = build(*a, **k)
            quantize_model(model, QuantSpec("nf4"))
            return model

        workloads.build_model = build_nf4
    return ours.main(
        ["--workload", "B1", "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    )


def _run(args: list[str]) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.qlora", *args], cwd=ROOT, capture_output=True, text=True
    )
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise RuntimeError(f"{args}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(line[len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["quickstart", "b1", "_child-quickstart", "_child-b1"])
    ap.add_argument("--variant", choices=["fp32", "nf4"])
    ap.add_argument("--pairs", type=int, default=2, help="b1: fp32/nf4 pairs, alternating")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-qlora")
    ap.add_argument(
        "--qs-steps", type=int, default=None, help="quickstart: steps (default: one epoch); a smoke test"
    )
    ap.add_argument("--dry", action="store_true", help="do not append to benchmarks/results.jsonl")
    ap.add_argument("--qs-eval", type=int, default=100, help="quickstart: held-out prompts scored")
    args = ap.parse_args(argv)
    if args.what == "_child-quickstart":
        print(
            "RESULT "
            + json.dumps(
                _child_quickstart(args.variant, Path(args.out), args.threads, args.qs_steps, args.qs_eval)
            ),
            flush=True,
        )
        return 0
    if args.what == "_child-b1":
        return _child_b1(args.variant, args.steps, args.warmup, args.threads)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    results = []
    if args.what == "quickstart":
        for v in ("fp32", "nf4"):
            results.append(
                _run(["_child-quickstart", "--variant", v, "--out", args.out, "--threads", str(args.threads)])
            )
            print("RESULT " + json.dumps(results[-1]), flush=True)
    else:
        for _ in range(args.pairs):
            for v in ("fp32", "nf4"):
                common = [
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                    "--threads",
                    str(args.threads),
                ]
                r = _run(["_child-b1", "--variant", v, *common])
                r |= {"bench": "qlora-b1", "variant": f"sftlab-lora-{v}"}
                results.append(r)
                print("RESULT " + json.dumps(r), flush=True)
    if args.dry:
        return 0
    with open(ROOT / "benchmarks" / "results.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps({"date": stamp, **r}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
