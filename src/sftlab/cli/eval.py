"""sftlab eval RUN_DIR [--data FILE]: loss/perplexity (LMs) or accuracy (classification)."""

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
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)")
    p.add_argument(
        "--base", action="store_true", help="evaluate the base model without the method, for comparison"
    )
    add_trust_remote_code(p, "the run's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import load_data
    from ..errors import ConfigError
    from ..eval.evaluate import evaluate
    from ..runs import load_run

    model, tok, cfg = load_run(args.run_dir, trust_remote_code=args.trust_remote_code)
    if cfg.data.tasks is not None and not args.data:
        names = ", ".join(t.name for t in cfg.data.tasks)
        raise ConfigError(
            f"{args.run_dir} was trained on a mixture of tasks ({names}); pass --data FILE (and --format if it is "
            f"not {cfg.data.format}) to evaluate on one file"
        )
    data_cfg = cfg.data.model_copy(
        update={
            "train": args.data or cfg.data.eval or cfg.data.train,
            "eval": None,
            "eval_fraction": 0.0,
            **({"format": args.format} if args.format else {}),
        }
    )
    if cfg.model.task == "seq-cls" and model.config.id2label:
        data_cfg = data_cfg.model_copy(
            update={"label_names": [model.config.id2label[i] for i in range(len(model.config.id2label))]}
        )
    data, _ = load_data(data_cfg, tok, cfg.model.task, cfg.train.seed)
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
    print(json.dumps({"data": data_cfg.train, "examples": len(data.examples), **res}, indent=2))
    return 0
