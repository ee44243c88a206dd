"""`sftlab plan`'s estimates against measured steps, per method: peak memory and tokens/s.

Runs `sftlab plan --measure --json` (each candidate's steps in its own process: `plan/measure.py`) on each
--model: by default the 20M-parameter Llama of examples/plan/llama-21m/config.json (the B1 workload's shape, scaled
down: random weights built from the config) and the SmolLM2-135M demo model (its real weights, cached by
`sftlab quickstart`), and prints a markdown table per model: estimate, measured, error = (estimate - measured) /
measured, then the closing figure over all rows. Tokens/s error: against the estimate made with the time model's
rates probed beside each method's steps (in its worker: the load of a shared machine moves between the plan's probes
and the steps minutes later); the error against the plan-time estimate is printed beside it. The B1 workload's model is examples/plan/b1/config.json (run it with
`--model examples/plan/b1/config.json --seq-len 256 --supervised-share 0.474`: B1's rows are 27-512 tokens). Targets from issue 19: memory within 15%, throughput within 30%.
Run under the bench lock: `flock /tmp/sftlab-bench.lock python -m benchmarks.plan_accuracy`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mb(n: float | None) -> str:
    return f"{n / 1e6:,.0f} MB" if n else "-"


def _pct(x: float | None) -> str:
    return f"{x:+.0%}" if x is not None else "-"


def run_model(model: str, args: argparse.Namespace, steps: str) -> tuple[int, int, int]:
    """One model's table; (rows, memory within 15%, tokens/s within 30%)."""
    cmd = [sys.executable, "-m", "sftlab.cli.main", "plan", "--model", model, "--examples", args.examples,
           "--seq-len", args.seq_len, "--supervised-share", args.supervised_share, "--batch-size", args.batch_size, "--device", "cpu", "--measure",
           "--measure-steps", steps, "--threads", args.threads, "--precision", args.precision, "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    plan = json.loads(out[out.index("{") :])
    print(f"### {plan['model']['source']}\n")
    print(f"{plan['workload']['described']}; measured on {plan['measured_on']}; estimates: "
          f"{plan['throughput']['described']}\n")  # fmt: skip
    print(
        "| method | peak est. | measured | err | tok/s est. at plan | est. beside | measured | err (beside) | err (plan) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    within_mem = within_tps = n = 0
    for c in plan["candidates"]:
        got = c.get("measured")
        if not got or got.get("peak_rss_delta") is None:
            continue
        n += 1
        pe, te = got["peak_error"], got.get("tokens_per_s_error_beside")
        te = te if te is not None else got["tokens_per_s_error"]
        within_mem += pe is not None and abs(pe) <= 0.15
        within_tps += te is not None and abs(te) <= 0.30
        est_tps, beside = c.get("est_tokens_per_s"), got.get("tokens_per_s_estimated_beside")
        print(f"| {c['label']} | {_mb(c['memory']['peak'])} | {_mb(got['peak_rss_delta'])} | {_pct(pe)} | "
              f"{est_tps:,.0f} | {f'{beside:,.0f}' if beside else '-'} | {got['tokens_per_s']:,.0f} | {_pct(te)} | "
              f"{_pct(got['tokens_per_s_error'])} |")  # fmt: skip
    print(f"\nmemory within 15%: {within_mem}/{n}; tokens/s within 30%: {within_tps}/{n}\n", flush=True)
    return n, within_mem, within_tps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--model",
        nargs="+",
        default=[str(ROOT / "examples" / "plan" / "llama-21m" / "config.json"), "smollm2-135m-instruct"],
    )
    p.add_argument("--examples", default="2000")
    p.add_argument("--seq-len", default="128")
    p.add_argument("--supervised-share", default="0.5", help="share of tokens the loss covers (B1: 0.474)")
    p.add_argument("--batch-size", default="8")
    p.add_argument("--steps", default="4", help="measured steps per method (the first is not timed)")
    p.add_argument(
        "--large-steps", default="3", help="steps for the second and later models (SmolLM2: ~10 s a step)"
    )
    p.add_argument("--threads", default="1")
    p.add_argument(
        "--precision", default="fp32", help="train.precision: fp32 or bf16-mixed (this CPU's autocast)"
    )
    args = p.parse_args()
    total = mem = tps = 0
    for i, model in enumerate(args.model):
        n, m, t = run_model(model, args, args.steps if i == 0 else args.large_steps)
        total, mem, tps = total + n, mem + m, tps + t
    print(f"all models: memory within 15% for {mem}/{total}, throughput within 30% for {tps}/{total}")


if __name__ == "__main__":
    main()
