"""sftlab self-train CONFIG [key=value ...]: pseudo-label an unlabelled pool with a teacher, train students."""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "self-train",
        help="Self-training: a teacher pseudo-labels unlabelled data, a student trains on labelled + pseudo-labelled.",
        description="Train a teacher on data.train (or take self_train.teacher), label self_train.unlabelled with it, "
        "keep confident (class-balanced) pseudo-labels, train a student on both, and repeat for self_train.rounds "
        "with the student as the next teacher. Rerunning continues where it stopped. See README 'Unlabelled data'.",
    )
    p.add_argument("config", help="YAML: a run config plus a self_train: section")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. self_train.rounds=3 train.lr=1e-4")
    add_trust_remote_code(
        p, "the model repo (model.trust_remote_code: true in the config needs this flag too)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..selftrain import SelfTraining, load_self_train, run_self_train
    from ..selftrain.plot import metric_of

    cfg, st = load_self_train(args.config, args.overrides, args.trust_remote_code)
    record = run_self_train(SelfTraining(cfg, st, args.config))
    teacher = (record.get("teacher") or {}).get("result")
    rows = [("teacher", None, teacher)] + [
        (f"round {r['round']}", r.get("kept"), (r.get("student") or {}).get("result"))
        for r in record["rounds"]
    ]
    for name, kept, result in rows:
        m = metric_of(result)
        shown = f"dev {m[0].removeprefix('eval_')} {m[1]:.4f}" if m else ""
        print(f"  {name:<10} {'' if kept is None else f'{kept} pseudo-labels':<20} {shown}")
    print(f"{record['status']}: self-training in {record['output_dir']} (selftrain.json, selftrain.png)")
    return 0 if record["status"] == "completed" else 1
