"""sftlab generate RUN_DIR "prompt": greedy (or sampled) continuation with a trained run."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="Generate text with a trained run.",
        description="Render PROMPT as a user turn (chat template) and generate the reply.",
    )
    p.add_argument("run_dir")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generate import generate
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir)
    outs = generate(
        model,
        tok,
        cfg.data,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        chat=not args.raw,
    )
    for prompt, out in zip(args.prompt, outs):
        print(f">>> {prompt}\n{out}\n")
    return 0
