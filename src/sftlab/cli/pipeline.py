"""sftlab pipeline PIPE.yaml [--output-dir DIR]: run stages in order, each from the previous stage's model."""

from __future__ import annotations

import argparse

from ._args import add_trust_remote_code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="Run a pipeline of training stages (e.g. self-supervised on domain text, then supervised).",
        description="Run the stages of PIPE.yaml in order, each a run config; `model.init_from: previous` starts a "
        "stage from the previous stage's model (a LoRA stage merged first). Rerunning continues: finished stages "
        "are kept, an interrupted one resumes exactly. See README 'Unlabelled data'.",
    )
    p.add_argument("pipeline", help="pipeline YAML: output_dir and stages (each a run config)")
    p.add_argument(
        "--output-dir", help="the pipeline directory (default: output_dir in the file, else runs/<name>)"
    )
    add_trust_remote_code(
        p, "the stages' models (model.trust_remote_code: true in a stage needs this flag too)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import PIPELINE_FILE, load_pipeline, run_pipeline

    pipe = load_pipeline(args.pipeline, args.output_dir, args.trust_remote_code)
    record = run_pipeline(pipe)
    for row in record["stages"]:
        res = row.get("result") or {}
        metric = next(
            (f"{k} {res[k]:.4g}" for k in ("eval_accuracy", "eval_loss") if res.get(k) is not None), ""
        )
        print(f"  {row['name']:<16} {row['status']:<14} {metric}")
    print(f"{record['status']}: pipeline in {pipe.output_dir} ({PIPELINE_FILE})")
    return 0 if record["status"] == "completed" else 1
