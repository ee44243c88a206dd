"""sftlab merge RUN_DIR OUT_DIR: fold a LoRA adapter into the base and write a plain HF model."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="Merge a LoRA run into a plain Hugging Face model directory.",
        description="Fold s·B·A (and DoRA magnitudes) into the base weights; the result loads with "
        "AutoModel*.from_pretrained and has zero adapter overhead.",
    )
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..methods.lora import merge_and_unload
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir)
    if cfg.method.name != "lora":
        raise ValueError(f"{args.run_dir}: merge needs a LoRA run (this one used method {cfg.method.name!r})")
    merged = merge_and_unload(model)
    merged.save_pretrained(args.out_dir, safe_serialization=True)
    tok.save_pretrained(args.out_dir)
    print(f"merged model written to {args.out_dir}")
    return 0
