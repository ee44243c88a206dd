"""sftlab plan --model M (--data FILE... | --examples N --seq-len L) [--device D] [--needs ...] [--measure]"""

from __future__ import annotations

import argparse
import re

from ._args import add_trust_remote_code, non_negative_float, positive_int

NEEDS = ("instructions", "many-tasks", "frequent-updates", "low-latency", "small-storage")


def duration(s: str) -> float:
    """`90m`, `2h`, `3600s`, `1d` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", s)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} is not a duration (e.g. 90m, 2h, 3600s)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def share(s: str) -> float:
    v = non_negative_float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (got {s})")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="Which method for this model, data and device: memory, FLOPs, time, storage, and a recommendation.",
        description="Estimate every fine-tuning method for a model (only its config is read: a 70B model needs no "
        "weights), data and device, and recommend one with its reasons. --measure runs a few real steps of each.",
    )
    p.add_argument("--model", required=True, help="HF id, model dir, config.json, .gguf, or tiny-llama/...")
    p.add_argument("--task", choices=["causal-lm", "seq-cls", "seq2seq"], help="default: from the config")
    data = p.add_argument_group("data (one of)")
    data.add_argument("--data", nargs="+", metavar="FILE", default=[], help="training files, counted")
    data.add_argument("--examples", type=positive_int, help="number of examples (with --seq-len)")
    data.add_argument("--seq-len", type=positive_int, help="tokens per example (with --examples)")
    data.add_argument("--target-len", type=positive_int, help="seq2seq: target tokens (default: --seq-len)")
    data.add_argument(
        "--supervised-share", type=share, default=0.5,
        help="causal-lm with --examples: share of tokens the loss covers (default 0.5: instruction data)",
    )  # fmt: skip
    data.add_argument("--format", default="alpaca", help="data.format of --data (default alpaca)")
    data.add_argument("--max-length", type=positive_int, default=512, help="data.max_length (default 512)")
    data.add_argument(
        "--column", action="append", default=[], metavar="KEY=FIELD",
        help="data.columns entry for --data, e.g. text=sentence (repeatable)",
    )  # fmt: skip
    p.add_argument("--tasks", type=positive_int, default=1, help="how many tasks the model will serve")
    p.add_argument("--device", help="cpu, cpu:64GB, cuda, cuda:24GB, cuda:80GBx8 (default: detected)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per step (default 8)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, "
                   "bfloat16 on CUDA")  # fmt: skip
    p.add_argument(
        "--precision", choices=["fp32", "bf16-mixed", "fp16-mixed"],
        help="train.precision (default fp32: the weights' dtype throughout; bf16-/fp16-mixed: autocast over "
        "fp32 weights, fp16 CUDA only)",
    )  # fmt: skip
    p.add_argument("--epochs", type=non_negative_float, default=1.0, help="epochs (time column; default 1)")
    p.add_argument("--time-budget", type=duration, help="longest acceptable epoch, e.g. 2h or 90m")
    p.add_argument("--needs", nargs="+", choices=NEEDS, default=[], help="what the application needs")
    p.add_argument(
        "--throughput", type=non_negative_float, metavar="TFLOPS",
        help="sustained training TFLOP/s of the device (default: measured matmul peak on this CPU, or the GPU's "
        "data-sheet peak x 0.4)",
    )  # fmt: skip
    p.add_argument("--measure", action="store_true", help="run a few real steps per method on this machine")
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads (default: the cores idle now, as training)"
    )
    p.add_argument("--measure-steps", type=positive_int, default=3, help="steps per method (default 3)")
    p.add_argument(
        "--measure-timeout", type=positive_int, default=600, help="seconds per method (default 600)"
    )
    p.add_argument("--write-config", metavar="OUT.yaml", help="write a runnable sftlab config for the choice")
    p.add_argument(
        "--method", metavar="KEY", help="with --write-config: this candidate instead (e.g. lora-r64)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_trust_remote_code(p, "the model repo (only for configs with custom code)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..errors import ConfigError
    from ..plan import PlanInputs, make_plan, measure_plan, write_config
    from ..plan.report import render, to_json

    if args.epochs <= 0:
        raise ConfigError("--epochs must be > 0")
    bad = [c for c in args.column if "=" not in c]
    if bad:
        raise ConfigError(f"--column: {bad[0]!r} is not KEY=FIELD (e.g. text=sentence)")
    inp = PlanInputs(
        model=args.model, task=args.task, data=list(args.data), format=args.format, max_length=args.max_length,
        columns=dict(c.split("=", 1) for c in args.column),
        examples=args.examples, seq_len=args.seq_len, target_len=args.target_len,
        supervised_share=args.supervised_share, tasks=args.tasks, device=args.device, batch_size=args.batch_size,
        dtype=args.dtype, precision=args.precision, epochs=args.epochs, time_budget_s=args.time_budget, needs=list(args.needs),
        throughput_tflops=args.throughput, trust_remote_code=args.trust_remote_code, threads=args.threads,
    )  # fmt: skip
    log = (lambda *_: None) if args.json else print
    plan = make_plan(inp, log)
    if args.measure:
        measure_plan(plan, args.measure_steps, args.measure_timeout, log)
    if args.json:
        print(json.dumps(to_json(plan), indent=2))
    else:
        render(plan)
    if args.write_config:
        key = args.method or plan.recommendation.choice
        if key is None:
            raise ConfigError("--write-config: no method fits; pass --method KEY to write one anyway")
        if key not in {e.key for e in plan.estimates}:
            keys = ", ".join(e.key for e in plan.estimates)
            raise ConfigError(f"--method: {key!r} is not a candidate; one of {keys}")
        path = write_config(plan, key, Path(args.write_config))
        if not args.json:
            print(f"wrote {path}: sftlab train {path}")
    elif args.method:
        raise ConfigError("--method picks the candidate --write-config writes; give --write-config too")
    return 0
