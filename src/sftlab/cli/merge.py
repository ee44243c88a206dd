"""sftlab merge RUN_DIR OUT_DIR: fold a run's method into the base (the method's `merge`) and write a plain HF model."""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a run's adapter (LoRA) into a plain Hugging Face model directory.",
        description="Fold the run's method into the base weights (LoRA: s·B·A and DoRA magnitudes); the result "
        "loads with AutoModel*.from_pretrained and has zero adapter overhead.",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir", help="new directory for the merged model (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..merged import merge_run

    out = merge_run(args.run_dir, args.out_dir, args.force, args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0
