"""sftlab generate RUN_DIR|MODEL ["prompt" ... | --prompts FILE]: greedy (or sampled) continuation with a trained run,
or with a model by name (an HF id, a local model directory, a tiny model, the demo alias): the base model, for
before/after. Prompts are rendered as a user turn with the chat template (the run's; a model's own, else ChatML)
unless --raw. With --prompts FILE (jsonl/json/csv: `prompt`, `messages` or alpaca `instruction`/`input` per record)
they run --batch-size at a time and the answers are written as jsonl (--output FILE, else stdout)."""

from __future__ import annotations

import argparse
import json

from ._args import add_trust_remote_code, non_negative_float, positive_int, probability


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="Generate text with a trained run or a model.",
        description="Render PROMPT as a user turn (chat template) and generate the reply, with a run directory "
        "or a model name/directory.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR|MODEL", help="a run directory, or a model name or directory")
    p.add_argument("prompt", nargs="*", help="one or more prompts (or --prompts FILE)")
    p.add_argument(
        "--prompts", help="a file of prompts (jsonl, json, csv): one record each, answered in batches"
    )
    p.add_argument("--output", help="with --prompts: write the jsonl rows here (default: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call (default 8)")
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
    p.add_argument(
        "--model-task",
        choices=["causal-lm", "seq2seq"],
        help="a model given by name: its kind (default: seq2seq for encoder-decoder models, else causal-lm)",
    )
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def _load(args: argparse.Namespace):
    """(model, tokenizer, data config or None, reserved positions): a run's, or a named model's with a chat config."""
    from pathlib import Path

    from ..config import DataConfig

    if (Path(args.run_dir) / "config.yaml").is_file() or args.task is not None:
        from ..data.tasks import task_data_config
        from ..runs import load_run

        model, tok, cfg = load_run(args.run_dir, trust_remote_code=args.trust_remote_code, task=args.task)
        data_cfg = cfg.data
        if args.task is not None:  # load_run checked the name
            data_cfg = task_data_config(cfg.data, next(t for t in cfg.data.tasks if t.name == args.task))
        return model, tok, data_cfg, getattr(cfg.method, "num_virtual_tokens", 0) or 0
    from ..errors import RunDirError
    from ..hub import load_model

    path = Path(args.run_dir)
    if path.is_dir() and not (path / "config.json").is_file():
        raise RunDirError(
            f"{path}: neither a run directory (no config.yaml) nor a model directory (no config.json)"
        )
    kind = args.model_task or _kind(args.run_dir)
    model, tok = load_model(args.run_dir, kind, trust_remote_code=args.trust_remote_code)
    model.eval()
    return model, tok, DataConfig(train=args.run_dir, format="messages"), 0


def _kind(name: str) -> str:
    """seq2seq for an encoder-decoder (tiny-t5, a local directory whose config says so), else causal-lm."""
    from pathlib import Path

    if name == "tiny-t5":
        return "seq2seq"
    config = Path(name) / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get("is_encoder_decoder"):
                return "seq2seq"
        except ValueError:
            pass
    return "causal-lm"


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..generate import generate, read_prompts

    if bool(args.prompt) == bool(args.prompts):
        raise ConfigError("generate: give prompts as arguments or --prompts FILE (one or the other)")
    if args.output and not args.prompts:
        raise ConfigError(
            "generate: --output writes the rows of --prompts FILE; prompts as arguments are printed"
        )
    items = read_prompts(args.prompts) if args.prompts else [(None, p) for p in args.prompt]
    model, tok, data_cfg, reserved = _load(args)
    outs = generate(
        model,
        tok,
        data_cfg,
        [p for _, p in items],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat=not args.raw,
        batch_size=args.batch_size,
        reserved_positions=reserved,
    )
    if not args.prompts:
        for prompt, out in zip(args.prompt, outs):
            print(f">>> {prompt}\n{out}\n")
        return 0
    lines = "".join(
        json.dumps({"where": where, "prompt": prompt, "completion": out}) + "\n"
        for (where, prompt), out in zip(items, outs)
    )
    if args.output:
        from pathlib import Path

        Path(args.output).write_text(lines)
        print(f"{len(items)} completions -> {args.output}")
    else:
        print(lines, end="")
    return 0
