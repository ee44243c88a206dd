"""sftlab convert llama2c MODEL.bin TOKENIZER.bin OUT_DIR: bring a llama2.c export into HF format."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="Convert a llama2.c export (e.g. stories260K) to an HF Llama directory.",
        description="Writes config.json, model.safetensors and a tokenizer that from_pretrained loads.",
    )
    p.add_argument("source_format", choices=["llama2c"])
    p.add_argument("model_bin")
    p.add_argument("tokenizer_bin")
    p.add_argument("out_dir")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert.llama2c import convert

    out = convert(args.model_bin, args.tokenizer_bin, args.out_dir)
    print(f"converted to {out}; use it as model.name: {out}")
    return 0
