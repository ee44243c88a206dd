"""Issue 16, item 14: a reloaded seq-cls run keeps the label names it was trained with, for every method. A PEFT-style
run rebuilds its base from model.name (whose head is named LABEL_0, LABEL_1, ...); `load_run` restores the run's
names, so `sftlab eval` maps string labels, and integer labels given in a non-index order, as training did."""

from __future__ import annotations

import json

import pytest
from helpers import classification_rows, make_config, write_jsonl

from sftlab.cli.main import main
from sftlab.recipe import train
from sftlab.runs import load_run

METHODS = {
    "lora": {"r": 4},
    "adapter": {"reduction_factor": 8},
    "prefix": {"num_virtual_tokens": 4},
    "prompt": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4, "encoder": "mlp"},
    "full": {},
}


def _run(tmp_path, method, rows, label_names, lr=3e-2):
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:24])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", rows[24:])
    cfg = make_config(
        tmp_path,
        model="tiny-bert",
        task="seq-cls",
        method={"name": method, **METHODS[method]},
        data={"train": str(train_file), "eval": str(eval_file), "label_names": label_names},
        train={"max_steps": 8, "eval_every": 8, "lr": lr},
    )
    summary = train(cfg, log=lambda *_: None)
    assert summary["status"] == "completed"
    return cfg, summary


def _sftlab_eval(run_dir, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", METHODS)
def test_eval_of_a_run_with_string_labels_matches_the_in_run_eval(tmp_path, capsys, method):
    rows = classification_rows(40)
    cfg, summary = _run(tmp_path, method, rows, ["pos", "neg"], lr=1e-3 if method == "full" else 3e-2)
    model, _, _ = load_run(cfg.train.output_dir)
    assert model.config.id2label == {0: "pos", 1: "neg"} and model.config.label2id == {"pos": 0, "neg": 1}
    res = _sftlab_eval(cfg.train.output_dir, capsys)
    assert res["examples"] == 16
    assert res["eval_accuracy"] == summary["eval_accuracy"]
    assert res["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_integer_labels_in_a_non_index_order_map_as_in_training(tmp_path, capsys, method):
    """label_names [1, 0]: the data's label 1 is output 0. A rebuilt base's LABEL_0/LABEL_1 would read the integer
    as the index and score every example against the other output."""
    rows = [{**r, "label": 1 if r["label"] == "pos" else 0} for r in classification_rows(40)]
    cfg, summary = _run(tmp_path, method, rows, ["1", "0"])
    res = _sftlab_eval(cfg.train.output_dir, capsys)
    assert res["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert res["eval_accuracy"] == summary["eval_accuracy"]
