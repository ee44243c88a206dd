"""sftlab quickstart: fine-tune a real small chat model on a task it fails, and show before/after."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="Fine-tune SmolLM2-135M-Instruct with LoRA on a JSON task and show before/after.",
        description="Get the demo model (once, into ~/.cache/sftlab), generate a person->JSON task (400 train / "
        "100 held-out), measure the base model, train a LoRA adapter with `sftlab train`'s code path, "
        "measure again and print a before/after table. The run directory is a normal run "
        "(sftlab eval / generate / merge work on it).",
    )  # fmt: skip
    p.add_argument(
        "--model", default=None, help="model to fine-tune instead of the demo model (e.g. tiny-llama)"
    )
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    p.add_argument("--n-train", type=int, default=400, help="training examples (default 400)")
    p.add_argument(
        "--n-eval", type=int, default=100, help="held-out examples measured before and after (default 100)"
    )
    p.add_argument("--output-dir", default="runs/quickstart", help="run directory; an older quickstart run there "
                   "is replaced (default runs/quickstart)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..quickstart.pipeline import QuickstartOptions, run_quickstart

    for flag in ("steps", "n_train", "n_eval"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1 (got {v})")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # three "Loading weights" bars would drown the story being told
    console = Console()
    opts = QuickstartOptions(model=args.model, steps=args.steps, n_train=args.n_train, n_eval=args.n_eval,
                             output_dir=args.output_dir, lr=args.lr)  # fmt: skip
    report = run_quickstart(opts, log=lambda msg: console.print(msg, markup=False, highlight=False))
    render(report, console)
    return 0


def render(report: dict[str, Any], console: Any) -> None:
    """The before/after table, three examples side by side, and what the training cost."""
    from rich.table import Table

    b, a, t = report["before"], report["after"], report["times"]
    table = Table(title=f"{report['model']} on {a['n']} held-out prompts", title_justify="left")
    table.add_column("")
    table.add_column("base model", justify="right")
    table.add_column("+ LoRA", justify="right")
    table.add_row("exact match (whole JSON object)", f"{b['exact']:.0%}", f"[bold green]{a['exact']:.0%}")
    table.add_row(
        "fields correct (name/age/city/occupation)", f"{b['fields']:.0%}", f"[bold green]{a['fields']:.0%}"
    )
    table.add_row("generation time", f"{b['seconds']:.0f} s", f"{a['seconds']:.0f} s")
    console.print(table)

    ex = Table(title="examples (held-out)", title_justify="left", show_lines=True)
    for col in ("sentence", "base model", "+ LoRA"):
        ex.add_column(col, overflow="fold", ratio=1)
    mark = {True: "[green]exact[/]", False: "[red]not exact[/]"}
    for e in report["examples"]:
        ex.add_row(
            _esc(e["sentence"]),
            f"{_esc(e['before'])}\n{mark[e['before_exact']]}",
            f"{_esc(e['after'])}\n{mark[e['after_exact']]}",
        )
    console.print(ex)

    m = report["method"]
    targets = m["target_modules"] if isinstance(m["target_modules"], str) else ",".join(m["target_modules"])
    tps = report["tokens_per_s"] or 0
    console.print(
        f"LoRA r={m['r']} alpha={m['alpha']:g} on {targets}: {report['trainable_params']:,} trainable of "
        f"{report['total_params']:,} parameters ({report['trainable_share']:.2%}); {report['steps']} steps, "
        f"final loss {report['train_loss']:.4f}",
        highlight=False,
    )
    console.print(
        f"time: training {t['train_s']:.0f} s ({tps:,.0f} tokens/s), evaluation {t['eval_before_s']:.0f} s + "
        f"{t['eval_after_s']:.0f} s, total {t['total_s']:.0f} s",
        highlight=False,
    )
    run_dir = report["run_dir"]
    console.print(
        f"run directory: {run_dir}  (config.yaml, metrics.jsonl, loss.png, final/, summary.json, quickstart.json)\n"
        f"try: sftlab generate {run_dir} \"<prompt>\"   |   sftlab train configs/smollm2-135m/lora.yaml",
        markup=False, highlight=False,
    )  # fmt: skip


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)
