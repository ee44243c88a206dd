"""sftlab generate RUN_DIR "prompt": greedy (or sampled) continuation with a trained run."""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code, non_negative_float, positive_int, probability


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="Generate text with a trained run.",
        description="Render PROMPT as a user turn (chat template) and generate the reply.",
    )
    p.add_argument("run_dir")
    p.add_argument("prompt", nargs="+", help="one or more prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (the default)")
    p.add_argument(
        "--top-p",
        type=probability,
        default=1.0,
        help="with --temperature > 0: sample from this probability mass",
    )
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument(
        "--task", help="a multi-task run: generate with this task's adapter and its template/system prompt"
    )
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.tasks import task_data_config
    from ..generate import generate
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir, trust_remote_code=args.trust_remote_code, task=args.task)
    data_cfg = cfg.data
    if args.task is not None:  # load_run checked the name
        data_cfg = task_data_config(cfg.data, next(t for t in cfg.data.tasks if t.name == args.task))
    outs = generate(
        model,
        tok,
        data_cfg,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat=not args.raw,
        reserved_positions=getattr(cfg.method, "num_virtual_tokens", 0) or 0,
    )
    for prompt, out in zip(args.prompt, outs):
        print(f">>> {prompt}\n{out}\n")
    return 0
