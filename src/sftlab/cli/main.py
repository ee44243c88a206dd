"""`sftlab` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = ["train", "eval", "generate", "merge", "convert", "quickstart"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftlab", description="Supervised fine-tuning of pretrained transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"sftlab.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..threads import set_wait_policy

    set_wait_policy()  # idle OpenMP threads sleep, not spin (threads.py); before anything imports torch
    args = build_parser().parse_args(argv)
    from ..errors import SftlabError

    try:
        return int(args.func(args) or 0)
    except SftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
