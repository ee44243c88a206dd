"""sftlab compare CONFIG --methods full,lora,adapter,prefix,prompt --budget STEPS|TIME [--out DIR] [key=value ...]"""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="Train several methods with the same budget and compare metric, size, time and inference cost.",
        description="Train each of --methods with the same --budget on CONFIG's data (each a run directory "
        "under --out, resumable: rerun after a kill to continue), evaluate each on data.eval, time inference "
        "against the base model (forward latency; generation tokens/s for causal-lm/seq2seq; LoRA merged), and "
        "write compare.json and compare.png. Learning rate: the "
        "config's train.lr when it sets one, else each method's default (sftlab plan's LEARNING_RATES).",
    )
    p.add_argument("config", help="YAML run config (its method section is replaced per method)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    p.add_argument(
        "--methods", default="full,lora,adapter,prefix,prompt", help="comma-separated method names"
    )
    p.add_argument(
        "--budget",
        required=True,
        help="per method: optimizer steps (200) or training time (90s, 5m, 1h: a clean stop with eval and "
        "checkpoint; the config's max_steps/epochs still bound the run and set the lr schedule)",
    )
    p.add_argument("--out", help="compare directory (default: <train.output_dir>/compare)")
    p.add_argument("--latency-batches", type=positive_int, default=4, help="eval batches timed (default 4)")
    p.add_argument(
        "--generation-tokens", type=positive_int, default=16, help="new tokens per prompt timed (default 16)"
    )
    p.add_argument("--overwrite", action="store_true", help="retrain every method, replacing earlier runs")
    p.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    add_trust_remote_code(
        p, "the model repo (model.trust_remote_code: true in the config needs this flag too)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from ..config import load_config
    from ..plan.compare import (
        COMPARE_JSON,
        COMPARE_PNG,
        HEADERS,
        compare,
        parse_budget,
        parse_methods,
        table_rows,
    )

    budget = parse_budget(args.budget)
    methods = parse_methods(args.methods)
    cfg = load_config(args.config, list(args.overrides), trust_remote_code=args.trust_remote_code)
    out = Path(args.out) if args.out else Path(cfg.train.output_dir) / "compare"
    result = compare(cfg, methods, budget, out, overwrite=args.overwrite, latency_batches=args.latency_batches,
                     generation_tokens=args.generation_tokens)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{result['metric']} after {budget.describe()} per method")
    for i, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        t.add_row(*row)
    Console().print(t)
    print(f"base model forward: {result['base_latency_ms_per_example']:.2f} ms/example over "
          f"{result['latency_examples']} eval examples, {result['threads']} thread(s)")  # fmt: skip
    if result["generation"]:
        g = result["generation"]
        print(f"base model generation: {result['base']['generation_tokens_per_s']:.1f} tokens/s ({g['prompts']} "
              f"prompts x {g['new_tokens']} new tokens, greedy)")  # fmt: skip
    print(f"wrote {out / COMPARE_JSON} and {out / COMPARE_PNG}")
    return 0
