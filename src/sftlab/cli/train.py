"""sftlab train CONFIG [key=value ...] [--resume]"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="Fine-tune a model as a YAML config says.",
        description="Train per CONFIG (YAML), with dotted overrides such as train.lr=1e-4 method.name=lora.",
    )
    p.add_argument(
        "config", nargs="?", help="YAML run config (optional when every key is given as an override)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, values parsed as YAML")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the sftlab run in output_dir (kept aside until the new run writes its first checkpoint)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..recipe import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    tps = summary.get("tokens_per_s") or 0
    print(
        f"{summary['status']}: {summary['steps']} steps, train loss {summary['train_loss']}, "
        f"{tps:,.0f} tokens/s; run in {summary['run_dir']}"
    )
    return 0 if summary["status"] in ("completed", "early-stopped") else 1
