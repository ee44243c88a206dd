"""sftlab eval RUN_DIR [--data FILE] [--task NAME] [--generate] [--metrics ...] [--base]: loss/perplexity (LMs) or
accuracy with per-class scores (classification), and generation metrics (exact, F1, BLEU, chrF, ROUGE-L) of the
run's answers; `--base` evaluates the base model the same way, side by side. The work is eval/run.py's.

A multi-task run (data.tasks): `--task NAME` evaluates one task with its own head/adapter (final/<task>/) on its own
eval data (its eval file or eval_fraction split, as in training; else its train file) or on --data FILE read with
the task's settings; with neither --task nor --data every task is evaluated and a per-task table printed (files
under RUN/eval/<task>/).
"""

from __future__ import annotations

import argparse
import json

from ._args import add_trust_remote_code, non_negative_float, positive_int, probability


def _metric_list(value: str) -> list[str]:
    from ..scores import METRICS

    names = [v.strip() for v in value.split(",") if v.strip()]
    allowed = (*METRICS, "loss")
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(allowed)} (got {value!r})"
        )
    return names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Evaluate a trained run on a dataset.",
        description="Loss and perplexity (causal-lm, seq2seq) or accuracy, confusion matrix and per-class "
        "precision/recall/F1 (seq-cls) of a trained run; with --generate or --metrics, generation metrics of its "
        "answers to every eval prompt. Writes eval.json and predictions.jsonl to RUN/eval/ (or --out) for "
        "classification and generation.",
    )
    p.add_argument("run_dir", help="a run directory written by sftlab train")
    p.add_argument("--data", help="dataset file (default: the run's eval data, else its train data)")
    p.add_argument("--format", help="data format, if different from the run's")
    p.add_argument(
        "--task",
        help="a multi-task run: evaluate this task (its head/adapter, its eval data); default: every task",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)")
    p.add_argument(
        "--base",
        action="store_true",
        help="also evaluate the base model without the method, the same way (before/after table)",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="answer every eval prompt (batched; greedy unless --temperature) and score the answers "
        "(default metrics: exact,f1)",
    )
    p.add_argument(
        "--metrics",
        type=_metric_list,
        default=[],
        help="comma-separated: exact, f1, acc (answer = a reference), bleu, chrf (sacrebleu), rouge (ROUGE-L), "
        "loss; any of the first six implies --generate. bleu/chrf/rouge need the `metrics` extra",
    )
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-p", type=probability, default=1.0, help="with --temperature > 0: nucleus mass")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        help="tokens to generate at most (default: the longest reference + 8)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--out", help="where eval.json and predictions*.jsonl go (default RUN/eval)")
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def options(args: argparse.Namespace, task: str | None, out: str | None):
    from ..eval.run import EvalOptions

    return EvalOptions(
        data=args.data,
        format=args.format,
        task=task,
        batch_size=args.batch_size,
        base=args.base,
        generate=args.generate,
        metrics=list(args.metrics),
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        out=out,
        trust_remote_code=args.trust_remote_code,
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import load_config
    from ..eval.run import evaluate_run, table

    cfg_path = Path(args.run_dir) / "config.yaml"
    if args.task is None and not args.data and cfg_path.is_file():
        tasks = load_config(cfg_path, migrate=True).data.tasks
        if tasks is not None:  # a multi-task run: every task, each with its own head/adapter and eval data
            rows = []
            for t in tasks:
                out = str(Path(args.out or Path(args.run_dir) / "eval") / t.name)
                rows.append(evaluate_run(args.run_dir, options(args, t.name, out)))
            print(_table(rows))
            print(json.dumps({"tasks": rows}, indent=2))
            return 0
    result = evaluate_run(args.run_dir, options(args, args.task, args.out))
    if "base" in result or "prompts" in result:
        print(table(result))
    print(json.dumps(result, indent=2))
    return 0


def _table(rows: list[dict]) -> str:
    """One line per task: examples, loss, and accuracy (seq-cls) or perplexity."""
    metric = "eval_accuracy" if "eval_accuracy" in rows[0] else "eval_perplexity"
    if metric not in rows[0]:  # generation only: the tasks' scores side by side
        from ..eval.run import SCORE_KEYS

        keys = [k for k in SCORE_KEYS if k in rows[0]]
        lines = ["task  " + "  ".join(keys)]
        return "\n".join(
            lines + [f"{r['task']}  " + "  ".join(f"{r.get(k, 0):.4f}" for k in keys) for r in rows]
        )
    width = max(4, *(len(r["task"]) for r in rows))
    lines = [f"{'task':<{width}}  {'examples':>8}  {'eval_loss':>9}  {metric:>15}"]
    for r in rows:
        lines.append(f"{r['task']:<{width}}  {r['examples']:>8}  {r['eval_loss']:>9.4f}  {r[metric]:>15.4f}")
    return "\n".join(lines)
