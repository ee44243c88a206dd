"""sftlab train CONFIG [key=value ...] [--resume | --resume-or-start | --overwrite]"""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code


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
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's newest checkpoint that verifies (an error when it has none)",
    )
    mode.add_argument(
        "--resume-or-start",
        action="store_true",
        help="resume when the run has a checkpoint, start it otherwise (for jobs that may be restarted)",
    )
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the sftlab run in output_dir (kept aside until the new run writes its first checkpoint)",
    )
    add_trust_remote_code(
        p, "the model repo (model.trust_remote_code: true in the config needs this flag too)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..recipe import train

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides, trust_remote_code=args.trust_remote_code)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, resume_or_start=args.resume_or_start)
    tps = summary.get("tokens_per_s") or 0
    print(
        f"{summary['status']}: {summary['steps']} steps, train loss {summary['train_loss']}, "
        f"{tps:,.0f} tokens/s; run in {summary['run_dir']}"
    )
    return 0 if summary["status"] in ("completed", "early-stopped") else 1
