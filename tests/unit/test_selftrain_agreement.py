"""Agreement of k sampled answers for generation pseudo-labels (issue 18 item 3, self_train.agreement_samples): the
samples are deterministic per seed, leave every other draw alone, and the filter removes the answers they disagree
with."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import alpaca_rows, write_jsonl

from sftlab.config import build_config
from sftlab.data import read_records
from sftlab.errors import ConfigError
from sftlab.recipe import train
from sftlab.runs import load_run
from sftlab.selftrain import SelfTraining, load_self_train, run_self_train
from sftlab.selftrain.predict import LOW_AGREEMENT, Agreement, generate_answers
from sftlab.selftrain.select import select

RUN = {"batch_size": 8, "schedule": "constant", "progress": False, "threads": 1}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny-llama trained a little on alpaca rows: its answers end, and sampling at a low temperature sometimes
    agrees with them and sometimes not."""
    tmp = tmp_path_factory.mktemp("agreement")
    labelled = write_jsonl(tmp / "sft.jsonl", alpaca_rows(32))
    pool = write_jsonl(tmp / "pool.jsonl", [{**r, "output": "never read"} for r in alpaca_rows(16, seed=5)])
    cfg = build_config({"model": {"name": "tiny-llama"},
                        "data": {"train": str(labelled), "format": "alpaca", "max_length": 128},
                        "train": {"output_dir": str(tmp / "teacher"), "max_steps": 60, "lr": 3e-3, **RUN}})  # fmt: skip
    train(cfg, log=lambda m: None)
    return {"dir": tmp, "run": tmp / "teacher", "labelled": labelled, "pool": pool}


def _answers(teacher, agreement):
    model, tok, cfg = load_run(teacher["run"])
    pool = read_records(teacher["pool"])
    return generate_answers(model, tok, cfg.data, pool, 24, 8, agreement)


def test_agreement_samples_are_deterministic_per_seed_and_move_no_other_draw(teacher):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = _answers(teacher, Agreement(4, 0.3, 0.5, (0, 1)))
    assert torch.equal(torch.get_rng_state(), before)  # drawn in a forked RNG
    b = _answers(teacher, Agreement(4, 0.3, 0.5, (0, 1)))
    other = _answers(teacher, Agreement(4, 0.3, 0.5, (1, 1)))  # another train.seed
    plain = _answers(teacher, None)
    key = lambda preds: [(p.response, p.agreement, p.reason) for p in preds]  # noqa: E731
    assert key(a) == key(b)
    assert [p.agreement for p in a] != [p.agreement for p in other]
    assert [p.response for p in a] == [p.response for p in other] == [p.response for p in plain]  # greedy
    assert len({p.agreement for p in a}) >= 3  # the samples really vary: not all 0 or all 1
    assert all(p.agreement is None for p in plain)


def test_the_agreement_filter_removes_the_answers_samples_disagree_with(teacher):
    agreed = _answers(teacher, Agreement(4, 0.3, 0.5, (0, 1)))
    plain = _answers(teacher, None)
    low = [i for i, p in enumerate(agreed) if plain[i].reason is None and p.agreement < 0.5]
    high = [i for i, p in enumerate(agreed) if plain[i].reason is None and p.agreement >= 0.5]
    assert low and high
    assert all(agreed[i].reason == LOW_AGREEMENT for i in low)
    assert all(agreed[i].reason is None for i in high)
    keep = lambda preds: select([0] * 16, [p.confidence for p in preds], 1, 0.0, None, [1.0],  # noqa: E731
                                [p.reason is None for p in preds])  # fmt: skip
    assert set(keep(plain)) - set(keep(agreed)) == set(low)


def _self_train(teacher, out: Path, **self_train) -> dict:
    raw = {
        "model": {"name": "tiny-llama"},
        "data": {"train": str(teacher["labelled"]), "format": "alpaca", "max_length": 128, "eval_fraction": 0.2},
        "train": {"output_dir": str(out), "max_steps": 10, "lr": 1e-3, **RUN},
        "self_train": {"unlabelled": str(teacher["pool"]), "teacher": str(teacher["run"]), "max_new_tokens": 24,
                       "agreement_samples": 4, "agreement_temperature": 0.3, **self_train},
    }  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, st = load_self_train(path)
    return run_self_train(SelfTraining(cfg, st, str(path)), log=lambda m: None)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_self_training_records_each_pseudo_labels_agreement_and_repeats_it(teacher):
    base = teacher["dir"]
    first = _self_train(teacher, base / "st-a")
    again = _self_train(teacher, base / "st-b")
    row = first["rounds"][0]
    pseudo = _rows(base / "st-a" / "round-1" / "pseudo.jsonl")
    assert pseudo and all(p["agreement"] >= 0.5 for p in pseudo)
    assert row["not_usable"].get(LOW_AGREEMENT, 0) > 0  # some answers were filtered out by their samples
    assert row["agreement"]["samples"] == 4 and row["agreement"]["mean_kept"] >= 0.5
    assert pseudo == _rows(
        base / "st-b" / "round-1" / "pseudo.jsonl"
    )  # per seed: the same rows, the same shares
    assert again["rounds"][0]["kept"] == row["kept"]


def test_agreement_on_a_classifier_is_a_config_error(tmp_path):
    raw = {"model": {"name": "tiny-bert", "task": "seq-cls"},
           "data": {"train": "x.jsonl", "format": "classification"},
           "self_train": {"unlabelled": "pool.jsonl", "agreement_samples": 3}}  # fmt: skip
    path = tmp_path / "st.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        ConfigError, match=r"self_train.agreement_samples: 3: agreement of sampled answers is for"
    ):
        load_self_train(path)
