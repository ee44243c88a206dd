"""sftlab merge RUN_DIR OUT_DIR: fold a run's method into the base (the method's `merge`) and write a plain HF model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a run's adapter (LoRA) into a plain Hugging Face model directory.",
        description="Fold the run's method into the base weights (LoRA: s·B·A and DoRA magnitudes); the result "
        "loads with AutoModel*.from_pretrained and has zero adapter overhead.",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..methods import get_method, method_names
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir)
    spec = get_method(cfg.method.name)
    if spec.merge is None:
        mergeable = [n for n in method_names() if get_method(n).merge is not None]
        raise ValueError(
            f"{args.run_dir}: method {cfg.method.name!r} cannot be merged into the base weights "
            f"(mergeable methods: {', '.join(mergeable)})"
        )
    merged = spec.merge(model)
    merged.save_pretrained(args.out_dir, safe_serialization=True)
    tok.save_pretrained(args.out_dir)
    print(f"merged model written to {args.out_dir}")
    return 0
