"""`sftlab eval` of one run (one task of a multi-task run): what the CLI, and the web UI through it, calls.

Three kinds of evaluation, each of the run's model and, with `base`, of its base model the same way (before/after):
- loss: mean loss per supervised token and perplexity (LMs) or accuracy (seq-cls), through the training objective
  (eval/evaluate.py), on the encoded data, as before;
- seq-cls: also each example's predicted class with the run's own label names (predictions.jsonl), the confusion
  matrix and per-class precision/recall/F1 (eval.json);
- generation (`generate`, or any metric of scores.METRICS on a causal-lm/seq2seq run): every prompt answered and
  scored (eval/generation.py); predictions.jsonl holds prompt, prediction, references and per-prompt scores. The
  loss is then computed only when `metrics` lists `loss`.
Files go to `out` (default RUN/eval/): eval.json (everything returned), predictions.jsonl and, with `base`,
predictions_base.jsonl.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..files import write_json
from ..quant import decoded_once
from ..scores import KEYS, check_metrics

LOSS = "loss"


@dataclass
class EvalOptions:
    """What `sftlab eval` was asked (the CLI flags)."""

    data: str | None = (
        None  # default: the run's eval data (eval file or eval_fraction split), else its train data
    )
    format: str | None = None
    task: str | None = None  # a multi-task run: this task's head/adapter and data
    batch_size: int = 8
    base: bool = False  # also the base model without the method, the same way
    generate: bool = False
    metrics: list[str] = field(default_factory=list)  # scores.METRICS names, and `loss`
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # default: the longest reference in tokens + 8
    seed: int = 0  # sampling (temperature > 0)
    out: str | None = None  # default RUN/eval; None with write=False: nothing written
    write: bool = True
    trust_remote_code: bool = False


def plan(opts: EvalOptions, model_task: str) -> tuple[bool, list[str], bool]:
    """(generate?, generation metrics, loss?) from the options, checked against the run's task before any model
    loads: a ConfigError names the metric and what the task allows."""
    names = [m for m in opts.metrics if m != LOSS]
    if model_task == "seq-cls":
        bad = [m for m in names if m != "acc"]
        if opts.generate or bad:
            what = f"--metrics {','.join(bad)}" if bad else "--generate"
            raise ConfigError(
                f"{what}: a seq-cls run predicts a class, it does not generate; its metrics are acc (with the "
                "confusion matrix and per-class precision/recall/F1) and loss"
            )
        return False, [], True
    generate = opts.generate or bool(names)
    if not generate:
        return False, [], True
    if model_task not in ("causal-lm", "seq2seq"):
        raise ConfigError(
            f"--generate: a {model_task} run does not generate answers; evaluate its loss instead"
        )
    return True, check_metrics(names or ["exact", "f1"]), LOSS in opts.metrics


def evaluate_run(run_dir: str | Path, opts: EvalOptions) -> dict:
    """Evaluate one run (one task with `opts.task`) as `opts` asks; returns what eval.json holds."""
    from ..runs import load_run

    run_dir = Path(run_dir)
    model, tok, cfg = load_run(run_dir, trust_remote_code=opts.trust_remote_code, task=opts.task)
    generate, metrics, with_loss = plan(opts, cfg.model.task)
    labels = None
    if cfg.model.task == "seq-cls" and model.config.id2label:
        labels = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    data_cfg, where = _data_config(cfg, opts, labels, generate, run_dir)
    result: dict[str, Any] = {**({"task": opts.task} if opts.task is not None else {}), "data": where}
    encoded = None
    if with_loss:
        encoded = _encoded(cfg, data_cfg, tok, opts)
        result["examples"] = len(encoded.examples)
    prompts = None
    if generate:
        from .generation import default_max_new_tokens, group_prompts

        records = _eval_records(cfg, data_cfg, opts)
        prompts = group_prompts(records, cfg.model.task)
        if not prompts:
            raise ConfigError(f"{where}: no record with a non-empty answer to score")
        max_new = opts.max_new_tokens or default_max_new_tokens(tok, prompts)
        result.update(
            records=len(records),
            prompts=len(prompts),
            metrics=[KEYS[m] for m in metrics],
            generation={
                "temperature": opts.temperature,
                "top_p": opts.top_p,
                "max_new_tokens": max_new,
                "batch_size": opts.batch_size,
                **({"seed": opts.seed} if opts.temperature > 0 else {}),
            },
        )
    outputs: dict[str, list[dict]] = {}
    for side in ("model", "base") if opts.base else ("model",):
        if side == "base":  # the run's model is done: free it before the base loads
            model = None
            gc.collect()
            model = _base_model(cfg, tok, labels)
        with decoded_once(model):  # a quantised base: each weight decoded once, not per batch or new token
            t0 = time.perf_counter()
            scores: dict[str, Any] = {}
            if with_loss:
                from .evaluate import evaluate

                scores.update(
                    evaluate(
                        model, encoded.examples, cfg.model.task, opts.batch_size, tok.pad_token_id, cfg.perf
                    )
                )
                if cfg.model.task == "seq-cls":
                    from .classify import predict, report

                    preds = predict(model, encoded.examples, opts.batch_size, tok.pad_token_id, cfg.perf)
                    rep, outputs[side] = report(encoded.examples, preds, labels, tok)
                    scores.update(rep)
            if generate:
                from .generation import answer, prompt_ids, score

                if opts.temperature > 0:
                    torch.manual_seed(opts.seed)
                ids = prompt_ids(tok, data_cfg, cfg.model.task, prompts)
                reserved = getattr(cfg.method, "num_virtual_tokens", 0) or 0
                predictions = answer(
                    model, tok, ids, result["generation"]["max_new_tokens"], opts.batch_size,
                    opts.temperature, opts.top_p, reserved if side == "model" else 0,
                )  # fmt: skip
                corpus, outputs[side] = score(metrics, prompts, predictions)
                scores.update(corpus)
            scores["seconds"] = time.perf_counter() - t0
        if side == "model":
            result.update(scores)
        else:
            result["base"] = scores
    if opts.write and outputs:
        out = Path(opts.out) if opts.out else run_dir / "eval"
        out.mkdir(parents=True, exist_ok=True)
        for side, rows in outputs.items():
            name = "predictions.jsonl" if side == "model" else "predictions_base.jsonl"
            tmp = out / f".{name}.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(out / name)
        result["out"] = str(out)
        write_json(out / "eval.json", {"run_dir": str(run_dir), **result})
    return result


def _data_config(
    cfg, opts: EvalOptions, labels: list[str] | None, generate: bool = False, run_dir: Path | None = None
):
    """The single-task data config this evaluation reads (the task's, with --data/--format), and where from."""
    from ..data.tasks import task_data_config

    data_cfg = cfg.data
    if opts.task is not None:
        data_cfg = task_data_config(cfg.data, next(t for t in cfg.data.tasks if t.name == opts.task))
    update: dict[str, Any] = {"tasks": None}
    if opts.data:
        from ..data.registry import lookup

        entry = lookup(opts.data, run_dir, "--data")  # a datasets.yaml name (the run dir's, the cwd's)
        if entry is not None:
            update.update({k: v for k, v in entry.keys.items() if k in type(data_cfg).model_fields})
        update.update(train=entry.source if entry else opts.data, eval=None, eval_fraction=0.0)
    if opts.format:
        update["format"] = opts.format
    if labels:
        update["label_names"] = labels
    data_cfg = data_cfg.model_copy(update=update)
    if opts.data:
        where = update["train"]
    elif data_cfg.eval:
        where = data_cfg.eval
    elif data_cfg.eval_fraction > 0:
        where = f"{data_cfg.train} (eval_fraction split)"
    else:
        where = data_cfg.train
    return data_cfg, where


def _encoded(cfg, data_cfg, tok, opts: EvalOptions):
    """The encoded examples the loss (and seq-cls predictions) are computed on: the eval file, else the eval_fraction
    split training made, else (or with --data) the whole train file."""
    from ..data import load_data

    if (
        opts.task is not None
    ):  # a task: its eval file or eval_fraction split, as in training; else its train file
        from ..data.tasks import load_task

        index = [t.name for t in cfg.data.tasks].index(opts.task)
        task_cfg = cfg.data.tasks[index].model_copy(
            update={
                k: getattr(data_cfg, k) for k in ("train", "eval", "eval_fraction", "format", "label_names")
            }
        )
        train, held = load_task(cfg.data, task_cfg, index, tok, cfg.model.task, cfg.train.seed)
        return held if held is not None else train
    if not data_cfg.eval and data_cfg.eval_fraction > 0:
        # The held-out split training cut from its train file: read and split by training's own loader (same seed,
        # same cut), so the eval set is exactly the one its evals scored (the train part is encoded and dropped).
        if cfg.train.objective != "sft":
            from ..data.corpus import load_corpus

            return load_corpus(data_cfg, tok, cfg.model.name, cfg.train)[1]
        return load_data(data_cfg, tok, cfg.model.task, cfg.train.seed)[1]
    flat = data_cfg.model_copy(
        update={"train": data_cfg.eval or data_cfg.train, "eval": None, "eval_fraction": 0.0}
    )
    if cfg.train.objective != "sft":  # a self-supervised run: its text in blocks, masked as its evals were
        from ..data.corpus import eval_corpus

        return eval_corpus(flat, tok, cfg.model.name, cfg.train)
    data, _ = load_data(flat, tok, cfg.model.task, cfg.train.seed)
    return data


def _eval_records(cfg, data_cfg, opts: EvalOptions) -> list:
    """Canonical records to generate for: the eval file, else the eval_fraction split (as training made it), else
    the train file; classification records of a task trained as text become their one-turn chats."""
    from ..data import read_records, split_eval
    from ..data.encode import to_records
    from ..data.tasks import TEXT_TASKS, labels_as_chats

    if cfg.train.objective != "sft":
        raise ConfigError(
            f"--generate: this run trained with train.objective {cfg.train.objective} on unlabelled text; there are "
            "no prompts and answers to score (its eval is the loss: drop --generate/--metrics)"
        )
    subset = getattr(data_cfg, "subset", None)
    read = lambda path: read_records(path, data_cfg.columns, data_cfg.limit, data_cfg.documents, **(  # noqa: E731
        {"subset": subset} if subset else {}))  # fmt: skip
    if data_cfg.eval:
        raw = read(data_cfg.eval)
    else:
        raw = read(data_cfg.train)
        if data_cfg.eval_fraction > 0:
            _, raw = split_eval(raw, data_cfg.eval_fraction, cfg.train.seed)
    fmt = data_cfg.format
    if fmt == "classification" and cfg.model.task in TEXT_TASKS:
        label = f"task {opts.task}" if opts.task else "data"
        return labels_as_chats(data_cfg, f"{label}.label_names")(raw)
    return to_records(raw, fmt, data_cfg.system_prompt)


def _base_model(cfg, tokenizer, labels: list[str] | None):
    """The run's base model without the method (a seq-cls base gets the run's label count and names)."""
    from ..hub import load_model

    m = cfg.model
    base, _ = load_model(
        m.name, m.task, m.dtype, len(labels) if labels else None, m.trust_remote_code,
        m.attn_implementation, tokenizer=tokenizer,
    )  # fmt: skip
    if labels:
        base.config.id2label = dict(enumerate(labels))
        base.config.label2id = {name: i for i, name in enumerate(labels)}
    base.eval()
    return base


SCORE_KEYS = ("eval_loss", "eval_perplexity", "eval_accuracy", "accuracy", "macro_f1", *KEYS.values())


def table(result: dict) -> str:
    """The scores side by side: one row per metric, the base model's column first when there is one."""
    sides = [("base", result["base"])] if "base" in result else []
    sides.append(("fine-tuned", result))
    keys = [k for k in SCORE_KEYS if isinstance(result.get(k), int | float)]
    width = max(6, *(len(k) for k in keys)) if keys else 6
    lines = [f"{'metric':<{width}}" + "".join(f"  {name:>10}" for name, _ in sides)]
    for k in keys:
        cells = [side.get(k) for _, side in sides]
        lines.append(
            f"{k:<{width}}" + "".join(f"  {c:>10.4f}" if c is not None else f"  {'-':>10}" for c in cells)
        )
    return "\n".join(lines)
