"""Continued pretraining, then SFT (issue 18): does a CLM stage on domain text change SmolLM2's SFT task metric?

SmolLM2-135M-Instruct (the quickstart's demo model, cached in ~/.cache/sftlab). Two ways to the quickstart task
(person sentence -> one JSON object; 400 train chats, 100 held-out, `sftlab quickstart`'s data and scorer):

  sft             LoRA SFT from the base model for `--sft-steps` steps (batch 4), the quickstart's recipe cut short
  clm->sft        `sftlab pipeline`: stage 1 CLM on ../shared/data/text/wiki_demo.txt (LoRA, `--clm-steps` steps of
                  4 blocks of 256 tokens, 3 articles held back by eval_fraction 0.1 for perplexity), merged, then
                  stage 2 the same LoRA SFT as `sft` (model.init_from: previous)

Scored on the 100 held-out prompts as the quickstart scores them (greedy; exact match of the whole JSON object, share
of fields right), for the base model, the stage-1 model, and each SFT run. The SFT budget is short on purpose: the
quickstart's full epoch (100 steps) reaches 100% either way, so only a short budget can show a difference. Seed 0 runs
through `sftlab pipeline`; further seeds (`--seeds 0,1`) train stage 2 by hand from stage 1's merged model (a pipeline
equals its stages run by hand: tested), so stage 1 runs once.

Heavy: take the benchmark lock.

  flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.continued_smollm2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from benchmarks.semi_supervised import run

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "text" / "wiki_demo.txt"
MODEL = "smollm2-135m-instruct"
LORA = {"name": "lora", "r": 16, "alpha": 16.0, "target_modules": "all-linear"}  # the quickstart's adapter


def clm_stage(args) -> dict:
    return {"name": "domain", "model": {"name": MODEL, "task": "causal-lm", "dtype": "float32"},
            "method": {**LORA, "alpha": 32.0},
            "data": {"train": str(WIKI), "documents": "line", "max_length": 256, "eval_fraction": 0.1},
            "train": {"objective": "clm", "max_steps": args.clm_steps, "batch_size": 4, "lr": 5e-4,
                      "warmup_steps": 4, "save_every": 20, "seed": 0, "progress": False}}  # fmt: skip


def sft_stage(model: dict, data: Path, seed: int, args) -> dict:
    return {"model": model, "method": dict(LORA),
            "data": {"train": str(data / "train.jsonl"), "format": "messages", "max_length": 512},
            "train": {"max_steps": args.sft_steps, "batch_size": 4, "group_by_length": False, "lr": 1e-3,
                      "schedule": "cosine", "warmup_steps": 3, "seed": seed, "progress": False}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clm-steps", type=int, default=40)
    p.add_argument("--sft-steps", type=int, default=20)
    p.add_argument("--seeds", default="0")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-continued-smollm2"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results.jsonl"))
    args = p.parse_args(argv)
    from sftlab.demo_model import obtain_demo_model
    from sftlab.hub import load_model, load_tokenizer
    from sftlab.quickstart.pipeline import QuickstartOptions, build_run_config, max_new_tokens_for, measure
    from sftlab.quickstart.task import make_splits, write_jsonl
    from sftlab.runs import load_run

    if obtain_demo_model(log=print) is None:
        sys.exit("needs the SmolLM2 demo model (sftlab quickstart fetches it)")
    work = Path(args.work)
    data = work / "data"
    train_recs, eval_recs = make_splits(400, 100, seed=0)
    write_jsonl(train_recs, data / "train.jsonl")
    write_jsonl(eval_recs, data / "eval.jsonl")
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()
    times: dict[str, float] = {}

    pipe_dir = work / "pipeline"
    pipe = {"output_dir": str(pipe_dir),
            "stages": [clm_stage(args), {"name": "sft", **sft_stage({"init_from": "previous"}, data, seeds[0], args)}]}  # fmt: skip
    (work / "pipeline.yaml").write_text(yaml.safe_dump(pipe, sort_keys=False))
    print("clm -> sft (sftlab pipeline)", flush=True)
    times["pipeline_s"] = run(["pipeline", str(work / "pipeline.yaml")], work / "pipeline.log")
    record = json.loads((pipe_dir / "pipeline.json").read_text())
    stage1 = record["stages"][0]
    merged = stage1["output"]
    runs = {("clm->sft", seeds[0]): Path(record["stages"][1]["run_dir"])}
    for seed in seeds:
        for setup, model in (("sft", MODEL), ("clm->sft", merged)):
            if (setup, seed) in runs:
                continue
            out = work / f"{setup.replace('->', '-')}-seed{seed}"
            cfg = sft_stage({"name": model, "task": "causal-lm", "dtype": "float32"}, data, seed, args)
            cfg["train"]["output_dir"] = str(out)
            path = work / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            print(f"{setup}, seed {seed}", flush=True)
            times[f"{out.name}_s"] = run(["train", str(path), "--resume-or-start"], work / f"{out.name}.log")
            runs[(setup, seed)] = out

    tokenizer = load_tokenizer(MODEL)
    max_new = max_new_tokens_for(tokenizer, eval_recs)
    cfg = build_run_config(
        MODEL, work / "score", QuickstartOptions()
    )  # the quickstart's data settings, for prompts
    scores: dict[str, dict] = {}
    for name, path in (("base", MODEL), ("after stage 1 (clm)", merged)):
        model, tok = load_model(path, "causal-lm", "float32")
        m = measure(model, tok, cfg, eval_recs, max_new)
        scores[name] = {"exact": m.exact, "fields": m.fields}
        print(f"  {name}: exact {m.exact:.2f}, fields {m.fields:.3f} ({m.seconds:.0f} s)", flush=True)
        del model
    for (setup, seed), run_dir in sorted(runs.items()):
        model, tok, _ = load_run(run_dir)
        m = measure(model, tok, cfg, eval_recs, max_new)
        summary = json.loads((run_dir / "summary.json").read_text())
        scores[f"{setup} seed {seed}"] = {
            "exact": m.exact,
            "fields": m.fields,
            "train_loss": summary.get("train_loss"),
        }
        print(
            f"  {setup} seed {seed}: exact {m.exact:.2f}, fields {m.fields:.3f} ({m.seconds:.0f} s)",
            flush=True,
        )
        del model
    wall = time.perf_counter() - t_start
    res1 = stage1.get("result", {})
    row = {"bench": "continued_smollm2", "when": time.strftime("%Y-%m-%d %H:%M"), "clm_steps": args.clm_steps,
           "sft_steps": args.sft_steps, "seeds": seeds, "stage1": res1, "scores": scores, "times": times,
           "wall_s": wall}  # fmt: skip
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\nSmolLM2-135M-Instruct; stage 1: {args.clm_steps} CLM steps, eval perplexity "
          f"{res1.get('eval_perplexity')}; SFT {args.sft_steps} LoRA steps of 4; {wall / 60:.1f} min")  # fmt: skip
    print("| model | exact match | fields right |\n|---|---|---|")
    for name, s in scores.items():
        print(f"| {name} | {s['exact']:.2f} | {s['fields']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
