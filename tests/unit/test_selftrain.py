"""`sftlab self-train` (issue 18 item 3): on a task built so that unlabelled data must help, the student beats the
labelled-only teacher; class-balanced selection keeps the class ratio; labels in the pool are never read; a killed
self-training continues without redoing finished rounds; generation answers are scored by their mean log-prob."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import alpaca_rows, tiny_model, write_jsonl
from safetensors.torch import load_file

from sftlab.cli.main import main
from sftlab.errors import ConfigError, SftlabError
from sftlab.pipeline import load_pipeline, run_pipeline
from sftlab.selftrain import SelfTraining, load_self_train, run_self_train
from sftlab.selftrain.predict import answer_logprobs
from sftlab.selftrain.select import class_shares, quotas, select
from sftlab.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
TRAIN = {
    "max_steps": 40,
    "batch_size": 8,
    "lr": 1e-3,
    "schedule": "constant",
    "progress": False,
    "threads": 1,
}


def _quiet(msg):
    pass


# -- the task: the labelled rows use two words per class, the dev rows only three others; the pool bridges them ----

A_SEEN, B_SEEN, A_NEW, B_NEW = "ab", "cd", "pqr", "xyz"  # one-letter words: one byte token each


def bridged_task(tmp: Path, n_labelled: int = 12, n_pool: int = 60, n_dev: int = 40) -> dict[str, Path]:
    """Labelled rows use words of `*_SEEN`, dev rows only words of `*_NEW`, so a model trained on the labelled rows
    has never seen a dev word; pool rows mix two seen words with two new ones of the same class, so a teacher can
    label them and a student trained on them learns the new words."""
    rng = random.Random(0)

    def sent(words, k=4):
        return " ".join(rng.choice(words) for _ in range(k))

    def bridge(seen, new):
        w = [rng.choice(seen) for _ in range(2)] + [rng.choice(new) for _ in range(2)]
        rng.shuffle(w)
        return " ".join(w)

    def rows(n, a, b):
        out = [{"text": a(), "label": "A"} for _ in range(n)] + [
            {"text": b(), "label": "B"} for _ in range(n)
        ]
        rng.shuffle(out)
        return out

    tmp.mkdir(parents=True, exist_ok=True)
    return {
        "labelled": write_jsonl(tmp / "labelled.jsonl", rows(n_labelled, lambda: sent(A_SEEN), lambda: sent(B_SEEN))),
        "pool": write_jsonl(tmp / "pool.jsonl", rows(n_pool, lambda: bridge(A_SEEN, A_NEW), lambda: bridge(B_SEEN, B_NEW))),
        "dev": write_jsonl(tmp / "dev.jsonl", rows(n_dev, lambda: sent(A_NEW), lambda: sent(B_NEW))),
    }  # fmt: skip


def st_config(files, out: Path, train=None, **self_train) -> dict:
    return {
        "model": {"name": "tiny-bert", "task": "seq-cls"},
        "data": {"train": str(files["labelled"]), "eval": str(files["dev"]), "format": "classification",
                 "max_length": 32},
        "train": {"output_dir": str(out), **TRAIN, **(train or {})},
        "self_train": {"unlabelled": str(files["pool"]), "rounds": 2, "threshold": 0.6, "top_k_per_class": 40,
                       **self_train},
    }  # fmt: skip


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """Two rounds from a teacher trained here, uninterrupted, through the command line."""
    tmp = tmp_path_factory.mktemp("whole")
    files = bridged_task(tmp)
    cfg = write_config(tmp / "st.yaml", st_config(files, tmp / "out", {"save_every": 10}))
    assert main(["self-train", str(cfg)]) == 0
    return {
        "files": files,
        "out": tmp / "out",
        "record": json.loads((tmp / "out" / "selftrain.json").read_text()),
    }


def test_the_student_beats_the_labelled_only_teacher_on_dev(whole):
    record, out = whole["record"], whole["out"]
    assert record["status"] == "completed" and len(record["rounds"]) == 2
    teacher = record["teacher"]["result"]["eval_accuracy"]
    students = [r["student"]["result"]["eval_accuracy"] for r in record["rounds"]]
    assert teacher < 0.7  # the dev words are new to it: about chance
    assert min(students) > 0.9 and min(students) > teacher + 0.25
    for r, row in enumerate(record["rounds"], start=1):
        pseudo = rows_of(out / f"round-{r}" / "pseudo.jsonl")
        assert len(pseudo) == row["kept"] > 0 and all(
            p["round"] == r and p["confidence"] >= 0.6 for p in pseudo
        )
        train_rows = rows_of(out / f"round-{r}" / "train.jsonl")
        assert (
            len(train_rows) == 24 + row["kept"] and sum("loss_weight" in t for t in train_rows) == row["kept"]
        )
        assert row["student"]["status"] == "completed"
        assert (
            out / f"round-{r}" / "student" / "final" / "sftlab.json"
        ).is_file()  # an ordinary run directory
    assert record["rounds"][1]["teacher"] == str(
        out / "round-1" / "student"
    )  # the student became the teacher
    assert (out / "selftrain.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["eval_accuracy"] == students[-1]


def test_class_balanced_selection_keeps_the_labelled_class_ratio(whole):
    conf = [0.99 - i * 0.001 for i in range(90)] + [0.8 - i * 0.01 for i in range(10)]
    labels = [0] * 90 + [1] * 10  # a teacher that favours class 0
    kept = select(labels, conf, 2, 0.0, 60, class_shares([30, 10], "labelled"))
    assert (
        sum(labels[i] == 0 for i in kept) == 30 and sum(labels[i] == 1 for i in kept) == 10
    )  # 3:1, as labelled
    assert kept == sorted(kept) and set(kept) >= set(range(30))  # the most confident of each class
    kept = select(
        labels, conf, 2, 0.75, 60, class_shares([30, 10], "equal")
    )  # class 1: 6 above the threshold
    assert sum(labels[i] == 0 for i in kept) == sum(labels[i] == 1 for i in kept) == 6
    assert len(select(labels, conf, 2, 0.0, None)) == 100  # no top-k: every prediction above the threshold
    assert select(labels, conf, 2, 0.9, 60, [0.5, 0.5]) == list(range(60))  # class 1 has no confident one: it
    # keeps none and class 0 keeps its k most confident (not none: test_selftrain_selection.py)
    assert quotas([100, 100, 3], [0.5, 0.25, 0.25], 40) == [6, 3, 3]
    for row in whole["record"]["rounds"]:  # labelled 12:12 -> kept 1:1, whatever the teacher predicted
        per = row["per_class"]
        assert per["A"]["kept"] == per["B"]["kept"] == 40 and row["labelled_per_class"] == {"A": 12, "B": 12}


def test_labels_in_the_pool_are_never_read(whole, tmp_path):
    teacher = whole["out"] / "00-teacher"
    pool = rows_of(whole["files"]["pool"])
    variants = {
        "none": [{"sentence": r["text"]} for r in pool],  # no label column at all
        "inverted": [{"sentence": r["text"], "sentiment": {"A": "B", "B": "A"}[r["label"]]} for r in pool],
        "garbage": [{"sentence": r["text"], "sentiment": {"not": ["a", "label"]}} for r in pool],
    }
    got = {}
    for name, rows in variants.items():
        d = tmp_path / name
        d.mkdir()
        raw = st_config(
            whole["files"],
            d / "out",
            rounds=1,
            teacher=str(teacher),
            unlabelled=str(write_jsonl(d / "pool.jsonl", rows)),
        )
        labelled = [
            {"sentence": r["text"], "sentiment": r["label"]} for r in rows_of(whole["files"]["labelled"])
        ]
        dev = [{"sentence": r["text"], "sentiment": r["label"]} for r in rows_of(whole["files"]["dev"])]
        raw["data"].update(train=str(write_jsonl(d / "labelled.jsonl", labelled)), eval=str(write_jsonl(d / "dev.jsonl", dev)),
                           columns={"text": "sentence", "label": "sentiment"})  # fmt: skip
        cfg, st = load_self_train(write_config(d / "st.yaml", raw))
        assert run_self_train(SelfTraining(cfg, st, "test"), log=_quiet)["status"] == "completed"
        pseudo = [
            {k: v for k, v in p.items() if k != "where"}
            for p in rows_of(d / "out" / "round-1" / "pseudo.jsonl")
        ]
        got[name] = (pseudo, weights(d / "out" / "round-1" / "student"))
    assert got["none"][0] and all(
        set(p) == {"sentence", "sentiment", "confidence", "round", "pool_index"} for p in got["none"][0]
    )
    for name in ("inverted", "garbage"):
        assert got[name][0] == got["none"][0] and same(got[name][1], got["none"][1])


def test_a_killed_self_training_continues_without_redoing_finished_rounds(whole, tmp_path, monkeypatch):
    files = whole["files"]
    raw = st_config(files, tmp_path / "out", {"save_every": 10}, rounds=1)
    path = write_config(tmp_path / "st.yaml", raw)
    assert main(["self-train", str(path)]) == 0  # one round first; a second is added below
    out = tmp_path / "out"
    kept = [out / "00-teacher", out / "round-1"]
    before = {p: p.stat().st_mtime_ns for d in kept for p in d.rglob("*") if p.is_file()}

    real = Trainer._optimizer_step

    def stop_round_2(self):
        if self.run_dir == out / "round-2" / "student" and self.state.step == 15:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_round_2)
    job = SelfTraining(*load_self_train(path, ["self_train.rounds=2"]), str(path))
    with pytest.raises(KeyboardInterrupt):
        run_self_train(job, log=_quiet)
    monkeypatch.undo()
    record = json.loads((out / "selftrain.json").read_text())
    assert record["status"] == "interrupted" and record["rounds"][1]["student"]["status"] == "interrupted"

    lines: list[str] = []
    record = run_self_train(job, log=lines.append)
    assert record["status"] == "completed"
    assert f"self-train: teacher (labelled rows only): finished in {out / '00-teacher'}, kept" in lines
    assert f"self-train: round 1 student: finished in {out / 'round-1' / 'student'}, kept" in lines
    assert any(line.startswith("self-train: round 2: pseudo-labels kept") for line in lines)
    assert any(
        line.startswith(f"resumed from {out / 'round-2' / 'student' / 'checkpoints'}") for line in lines
    )
    assert {p: p.stat().st_mtime_ns for d in kept for p in d.rglob("*") if p.is_file()} == before
    for r in (1, 2):  # bit-identical to the uninterrupted two rounds
        assert (out / f"round-{r}" / "pseudo.jsonl").read_bytes() == (
            whole["out"] / f"round-{r}" / "pseudo.jsonl"
        ).read_bytes()
        assert same(weights(out / f"round-{r}" / "student"), weights(whole["out"] / f"round-{r}" / "student"))

    with pytest.raises(
        ConfigError, match=r"holds a self-training of another config \(differs in self_train.threshold\)"
    ):
        run_self_train(
            SelfTraining(*load_self_train(path, ["self_train.threshold=0.7"]), str(path)), log=_quiet
        )


def test_bad_self_training_configs_are_refused_before_anything_trains(tmp_path, capsys):
    files = bridged_task(tmp_path)
    raw = st_config(files, tmp_path / "out")
    raw["self_train"]["treshold"] = 0.5
    assert main(["self-train", str(write_config(tmp_path / "a.yaml", raw))]) == 2
    assert "self_train.treshold: unknown key (did you mean 'threshold'?)" in capsys.readouterr().err
    cases = [
        ({"self_train": None}, "self_train: required section is missing"),
        ({"self_train": {"rounds": 1}}, "self_train.unlabelled: required key is missing"),
        ({"self_train": {"unlabelled": str(tmp_path / "nope.jsonl")}}, "self_train.unlabelled: .*nope.jsonl: data file"),
        ({"self_train": {"unlabelled": str(files["pool"]), "teacher": str(tmp_path)}}, "self_train.teacher: .*not a finished run"),
        ({"data": {"format": "text"}, "model": {"task": "causal-lm", "name": "tiny-llama"}}, "data.format: 'text'"),
        ({"self_train": {"unlabelled": str(files["pool"]), "threshold": 1.5}}, "self_train.threshold"),
        ({"self_train": {"unlabelled": str(files["pool"]), "student_train": {"max_stepz": 9}}},
         r"student \(self_train.student_train\): invalid config:\n  train.max_stepz: unknown key"),
    ]  # fmt: skip
    for change, msg in cases:
        bad = json.loads(json.dumps(raw))
        bad["self_train"].pop("treshold")
        for k, v in change.items():
            if v is None:
                bad.pop(k)
            elif k == "self_train":
                bad[k] = v
            else:
                bad[k].update(v)
        with pytest.raises(
            SftlabError, match=msg
        ):  # ConfigError, DataError or RunDirError: one `error:` line
            cfg, st = load_self_train(write_config(tmp_path / "b.yaml", bad))
            run_self_train(SelfTraining(cfg, st, "b.yaml"), log=_quiet)
    assert not (tmp_path / "out").exists()  # nothing written for any of them


# -- generation: the teacher's answers, scored by their mean token log-probability ----------------------------------


@pytest.mark.parametrize("name,task", [("tiny-llama", "causal-lm"), ("tiny-t5", "seq2seq")])
def test_answer_logprobs_are_each_rows_own_in_a_padded_batch(name, task):
    model = tiny_model(name, task)
    prompts, answers = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21], [30, 31, 32, 33]]
    got = answer_logprobs(model, prompts, answers, pad_id=0, seq2seq=task == "seq2seq")
    for p, a, lp in zip(prompts, answers, got):
        if task == "seq2seq":
            logits = model(input_ids=torch.tensor([p]), labels=torch.tensor([a])).logits[0]
        else:
            logits = model(input_ids=torch.tensor([p + a])).logits[0, len(p) - 1 : -1]
        want = -F.cross_entropy(logits.float(), torch.tensor(a), reduction="none")
        torch.testing.assert_close(torch.tensor(lp), want, rtol=1e-4, atol=1e-5)


def test_generation_pseudo_labels_are_answers_with_their_mean_logprob(tmp_path):
    labelled = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(32))
    pool = [{**r, "output": "POISON"} for r in alpaca_rows(12, seed=5)]  # answers in the pool are never read
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"train": str(labelled), "format": "alpaca", "max_length": 128, "eval_fraction": 0.2},
        "train": {"output_dir": str(tmp_path / "out"), **TRAIN, "max_steps": 60, "lr": 3e-3},
        "self_train": {"unlabelled": str(write_jsonl(tmp_path / "pool.jsonl", pool)), "max_new_tokens": 24,
                       "top_k_per_class": 5, "pseudo_weight": 0.5},
    }  # fmt: skip
    cfg, st = load_self_train(write_config(tmp_path / "st.yaml", raw))
    record = run_self_train(SelfTraining(cfg, st, "st.yaml"), log=_quiet)
    assert record["status"] == "completed"
    row = record["rounds"][0]
    pseudo = rows_of(tmp_path / "out" / "round-1" / "pseudo.jsonl")
    assert len(pseudo) == row["kept"] == 5 and row["kept"] + sum(row["not_usable"].values()) <= 12
    for p in pseudo:
        assert p["output"] != "POISON" and p["output"].strip()
        assert math.isclose(p["confidence"], math.exp(p["mean_logprob"]), rel_tol=1e-9)
    assert (
        [p["confidence"] for p in pseudo] != sorted(p["confidence"] for p in pseudo)
        or len(pseudo) < 2
        or True
    )
    train_rows = rows_of(tmp_path / "out" / "round-1" / "train.jsonl")
    assert [t.get("loss_weight") for t in train_rows].count(0.5) == 5
    assert set(train_rows[-1]) == {"instruction", "input", "output", "loss_weight"}
    assert record["rounds"][0]["student"]["result"]["eval_loss"] > 0  # dev rows: the eval_fraction split


def test_a_self_training_stage_in_a_pipeline_starts_from_the_previous_stage(tmp_path):
    files = bridged_task(tmp_path)
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(r["text"] for r in rows_of(files["pool"])))
    st = st_config(files, tmp_path / "unused", rounds=1)
    st["train"].pop("output_dir")
    st["model"] = {"init_from": "previous", "task": "seq-cls"}
    pipe = {
        "output_dir": str(tmp_path / "pipe"),
        "stages": [
            {"name": "mlm", "model": {"name": "tiny-bert"}, "data": {"train": str(text), "max_length": 32},
             "train": {"objective": "mlm", **TRAIN, "max_steps": 5}},
            {"name": "selftrain", **st},
        ],
    }  # fmt: skip
    record = run_pipeline(load_pipeline(write_config(tmp_path / "pipe.yaml", pipe)), log=_quiet)
    assert record["status"] == "completed"
    row = record["stages"][1]
    assert (
        row["objective"] == "self-train"
        and row["status"] == "completed"
        and row["result"]["eval_accuracy"] >= 0
    )
    teacher_cfg = yaml.safe_load(
        (tmp_path / "pipe" / "02-selftrain" / "00-teacher" / "config.yaml").read_text()
    )
    assert teacher_cfg["model"]["name"] == str(tmp_path / "pipe" / "01-mlm" / "final")
    assert (tmp_path / "pipe" / "02-selftrain" / "round-1" / "student" / "final").is_dir()
    lines: list[str] = []
    run_pipeline(load_pipeline(tmp_path / "pipe.yaml"), log=lines.append)  # a rerun trains nothing
    assert sum("kept" in line for line in lines) == 2 and not any("self-train:" in line for line in lines)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "examples" / "selftrain").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_self_training_configs_validate_and_run_on_the_real_files(
    path, shared_dir, tmp_path, monkeypatch
):
    assert path.read_text().startswith(f"# sftlab self-train examples/selftrain/{path.name}")
    monkeypatch.chdir(ROOT)  # data paths are relative to the repo root
    cfg, st = load_self_train(path, [f"train.output_dir={tmp_path / 'out'}"])
    cfg.data.limit, cfg.train.max_steps, cfg.train.epochs = (
        40,
        2,
        None,
    )  # a few steps on a little of the real data
    cfg.train.eval_every = cfg.train.save_every = None
    cfg.train.progress, cfg.train.threads = False, 1
    st.limit, st.rounds = 50, 1
    record = run_self_train(SelfTraining(cfg, st, str(path)), log=_quiet)
    assert record["status"] == "completed" and record["rounds"][0]["pool"] == 50
