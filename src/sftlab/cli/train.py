"""sftlab train CONFIG [key=value ...] [--resume | --resume-or-start | --overwrite] [--nproc N]"""

from __future__ import annotations

import argparse
import os
import sys

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
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train data-parallel in N processes on this machine: runs `torchrun --nproc_per_node N -m sftlab train "
        "...` (train.distributed: ddp unless the config says fsdp; one GPU each, or gloo on the CPU)",
    )
    p.set_defaults(func=run)


def torchrun_argv(nproc: int, args: argparse.Namespace) -> list[str]:
    """The torchrun command that `--nproc N` becomes: the same `sftlab train` arguments, without --nproc."""
    flags = [
        f for f in ("resume", "resume_or_start", "overwrite", "trust_remote_code") if getattr(args, f, False)
    ]
    train = ["train", *([args.config] if args.config else []), *args.overrides]
    train += ["--" + f.replace("_", "-") for f in flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "sftlab", *train]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..errors import ConfigError
    from ..recipe import train

    if args.nproc is not None:
        if args.nproc < 1:
            raise ConfigError(f"--nproc: {args.nproc} processes; expected 1 or more")
        if "WORLD_SIZE" in os.environ:
            raise ConfigError("--nproc: already running under torchrun (WORLD_SIZE is set); drop --nproc")
        argv = torchrun_argv(args.nproc, args)
        os.execv(argv[0], argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        overrides.insert(0, config)
        config = None
    cfg = load_config(config, overrides, trust_remote_code=args.trust_remote_code)
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite, resume_or_start=args.resume_or_start)
    if summary.get("rank"):  # a distributed run's other processes: rank 0 reports
        return 0 if summary["status"] in ("completed", "early-stopped") else 1
    tps = summary.get("tokens_per_s") or 0
    print(
        f"{summary['status']}: {summary['steps']} steps, train loss {summary['train_loss']}, "
        f"{tps:,.0f} tokens/s; run in {summary['run_dir']}"
    )
    return 0 if summary["status"] in ("completed", "early-stopped") else 1
