"""Class-balanced pseudo-label selection when a class is never confident (TREC's 1-example ABBR class): the other
classes are balanced among themselves instead of all keeping nothing, a warning names the class, and round.json
records it with each class's kept count. With a confident candidate in every class the rule is unchanged."""

import json
import random
from types import SimpleNamespace

import torch
from helpers import write_jsonl

from sftlab.config import build_config
from sftlab.data import RawRecord
from sftlab.selftrain import SelfTrainConfig, SelfTraining
from sftlab.selftrain import run as st_run
from sftlab.selftrain.predict import Prediction
from sftlab.selftrain.select import class_shares, quotas, select

NAMES = ["DESC", "ENTY", "ABBR"]


def test_a_class_with_no_confident_candidate_does_not_zero_the_others():
    labels = [0] * 30 + [1] * 30 + [2] * 5
    conf = [0.99 - i * 0.001 for i in range(60)] + [0.3] * 5  # ABBR predicted, never confidently
    shares = class_shares([10, 10, 1], "labelled")
    kept = select(labels, conf, 3, 0.9, 8, shares)
    assert [sum(labels[i] == c for i in kept) for c in range(3)] == [8, 8, 0]
    assert kept == list(range(8)) + list(range(30, 38))  # each class's most confident, in pool order
    assert quotas([20, 0, 4], [0.5, 0.25, 0.25], 40) == [
        8,
        0,
        4,
    ]  # the scarcest class *with* candidates sets t
    assert quotas([0, 0], [0.5, 0.5], 40) == [0, 0]


def _old_quotas(available, shares, top_k):
    """The rule before the fix (every class with share > 0 sets t): with candidates in every class, unchanged."""
    top = max(shares)
    t = min([float(top_k)] + [a * top / s for a, s in zip(available, shares) if s > 0])
    return [min(a, round(t * s / top + 1e-9)) if s > 0 else 0 for a, s in zip(available, shares)]


def test_with_candidates_in_every_class_the_quotas_are_as_before():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 6)
        available = [rng.randint(1, 50) for _ in range(n)]
        shares = class_shares([rng.randint(0, 30) for _ in range(n)], rng.choice(["labelled", "equal"]))
        top_k = rng.randint(1, 60)
        assert quotas(available, shares, top_k) == _old_quotas(available, shares, top_k)


def test_a_round_with_a_never_confident_class_still_keeps_pseudo_labels_and_says_so(tmp_path, monkeypatch):
    labelled_rows = [{"text": f"d {i}", "label": "DESC"} for i in range(10)]
    labelled_rows += [{"text": f"e {i}", "label": "ENTY"} for i in range(10)] + [
        {"text": "a", "label": "ABBR"}
    ]
    labelled_file = write_jsonl(tmp_path / "labelled.jsonl", labelled_rows)
    raw = {
        "model": {"name": "tiny-bert", "task": "seq-cls"},
        "data": {"train": str(labelled_file), "format": "classification"},
        "train": {"output_dir": str(tmp_path / "st")},
    }
    st = SelfTrainConfig(unlabelled=str(labelled_file), threshold=0.9, top_k_per_class=5)
    job = SelfTraining(build_config(raw, "t.yaml"), st, "t.yaml")
    labelled = [RawRecord(f"l:{i}", r) for i, r in enumerate(labelled_rows)]
    pool = [RawRecord(f"p:{i}", {"text": f"pool {i}"}) for i in range(50)]
    # The teacher: DESC and ENTY confident, ABBR predicted only below the threshold.
    preds = [Prediction(i, i % 3, None, 0.95 - i * 0.001 if i % 3 < 2 else 0.5) for i in range(50)]
    monkeypatch.setattr(
        st_run,
        "load_run",
        lambda *a, **k: (torch.nn.Identity(), None, SimpleNamespace(model=SimpleNamespace(task="seq-cls"))),
    )
    monkeypatch.setattr(st_run, "weights_digest", lambda path: "digest")
    monkeypatch.setattr(st_run, "classify", lambda *a, **k: preds)
    lines = []
    meta = st_run.pseudo_label(job, 1, tmp_path / "teacher", pool, labelled, NAMES, None, lines.append)

    assert meta["kept"] == 10
    assert {n: c["kept"] for n, c in meta["per_class"].items()} == {"DESC": 5, "ENTY": 5, "ABBR": 0}
    assert meta["no_confident"] == ["ABBR"]
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1 and "ABBR" in warning[0] and "DESC" not in warning[0]
    saved = json.loads((job.round_dir(1) / "round.json").read_text())
    assert saved["per_class"] == meta["per_class"] and saved["no_confident"] == ["ABBR"]
    pseudo = [json.loads(x) for x in (job.round_dir(1) / "pseudo.jsonl").read_text().splitlines()]
    assert sorted(p["label"] for p in pseudo) == ["DESC"] * 5 + ["ENTY"] * 5
