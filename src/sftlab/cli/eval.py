"""sftlab eval RUN_DIR [--data FILE] [--task NAME]: loss/perplexity (LMs) or accuracy (classification).

A multi-task run (data.tasks): `--task NAME` evaluates one task with its own head/adapter (final/<task>/) on its own
eval data (its eval file or eval_fraction split, as in training; else its train file) or on --data FILE read with
the task's settings; with neither --task nor --data every task is evaluated and a per-task table printed.
"""

from __future__ import annotations

import argparse
import json

from ._args import add_trust_remote_code, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Evaluate a trained run on a dataset.",
        description="Loss and perplexity (causal-lm, seq2seq) or accuracy (seq-cls) of a trained run.",
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
        "--base", action="store_true", help="evaluate the base model without the method, for comparison"
    )
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import load_config

    cfg_path = Path(args.run_dir) / "config.yaml"
    if args.task is None and not args.data and cfg_path.is_file():
        tasks = load_config(cfg_path, migrate=True).data.tasks
        if tasks is not None:  # a multi-task run: every task, each with its own head/adapter and eval data
            rows = [_evaluate(args, t.name) for t in tasks]
            print(_table(rows))
            print(json.dumps({"tasks": rows}, indent=2))
            return 0
    print(json.dumps(_evaluate(args, args.task), indent=2))
    return 0


def _evaluate(args: argparse.Namespace, task: str | None) -> dict:
    """One evaluation: the run's model (a task's, with `task`) on the chosen data."""
    from ..data import load_data
    from ..data.tasks import load_task
    from ..eval.evaluate import evaluate
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir, trust_remote_code=args.trust_remote_code, task=task)
    labels = None
    if cfg.model.task == "seq-cls" and model.config.id2label:
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    if task is not None:
        index = [t.name for t in cfg.data.tasks].index(task)
        task_cfg = cfg.data.tasks[index]
        if labels:
            task_cfg = task_cfg.model_copy(update={"label_names": labels})
        if args.data or args.format:
            update = {"train": args.data or task_cfg.train, "eval": None, "eval_fraction": 0.0}
            task_cfg = task_cfg.model_copy(
                update={**update, **({"format": args.format} if args.format else {})}
            )
        train, held = load_task(cfg.data, task_cfg, index, tok, cfg.model.task, cfg.train.seed)
        data = held if held is not None else train
        where = (
            task_cfg.train if held is None else (task_cfg.eval or f"{task_cfg.train} (eval_fraction split)")
        )
    else:
        data_cfg = cfg.data.model_copy(
            update={
                "train": args.data or cfg.data.eval or cfg.data.train,
                "eval": None,
                "eval_fraction": 0.0,
                "tasks": None,
                **({"format": args.format} if args.format else {}),
                **({"label_names": labels} if labels else {}),
            }
        )
        if (
            cfg.train.objective != "sft"
        ):  # a self-supervised run: its text in blocks, masked as its evals were
            from ..data.corpus import eval_corpus

            data = eval_corpus(data_cfg, tok, cfg.model.name, cfg.train)
        else:
            data, _ = load_data(data_cfg, tok, cfg.model.task, cfg.train.seed)
        where = data_cfg.train
    if args.base:
        from ..hub import load_model

        m = cfg.model
        model, _ = load_model(
            m.name,
            m.task,
            m.dtype,
            model.config.num_labels if m.task == "seq-cls" else None,
            m.trust_remote_code,
        )
    res = evaluate(model, data.examples, cfg.model.task, args.batch_size, tok.pad_token_id, cfg.perf)
    return {
        **({"task": task} if task is not None else {}),
        "data": where,
        "examples": len(data.examples),
        **res,
    }


def _table(rows: list[dict]) -> str:
    """One line per task: examples, loss, and accuracy (seq-cls) or perplexity."""
    metric = "eval_accuracy" if "eval_accuracy" in rows[0] else "eval_perplexity"
    width = max(4, *(len(r["task"]) for r in rows))
    lines = [f"{'task':<{width}}  {'examples':>8}  {'eval_loss':>9}  {metric:>15}"]
    for r in rows:
        lines.append(f"{r['task']:<{width}}  {r['examples']:>8}  {r['eval_loss']:>9.4f}  {r[metric]:>15.4f}")
    return "\n".join(lines)
