"""`sftlab eval` of a run trained with data.eval_fraction scores the held-out split training cut from its train file
(same seed, same cut), not the whole file: its loss equals the training run's own final eval loss."""

from __future__ import annotations

import json

import pytest
from helpers import make_config

from sftlab.config import build_config
from sftlab.eval.run import EvalOptions, evaluate_run
from sftlab.recipe import train

WORDS = ["cat", "dog", "sun", "moon", "tree", "fish", "bird", "red", "blue", "green"]


def corpus_config(tmp, objective: str, model: str):
    text = tmp / "corpus.txt"
    text.write_text("".join(f"the {WORDS[i % 10]} sat by the {WORDS[(7 * i) % 10]}\n" for i in range(40)))
    return build_config({
        "model": {"name": model},
        "data": {"train": str(text), "max_length": 24, "eval_fraction": 0.2},
        "train": {"objective": objective, "output_dir": str(tmp / "run"), "max_steps": 3, "batch_size": 4,
                  "lr": 1e-3, "schedule": "constant", "progress": False, "threads": 1, "eval_every": 3},
    })  # fmt: skip


@pytest.mark.parametrize(
    "kind", ["sft-causal-lm", "sft-seq-cls", "clm"]
)  # the sft loader and the corpus loader
def test_eval_of_an_eval_fraction_run_scores_its_held_out_split(tmp_path, kind):
    if kind == "clm":
        cfg = corpus_config(tmp_path, "clm", "tiny-llama")
    else:
        model, task = ("tiny-llama", "causal-lm") if kind == "sft-causal-lm" else ("tiny-bert", "seq-cls")
        cfg = make_config(
            tmp_path, model, task, n=32, data={"eval_fraction": 0.25}, train={"max_steps": 3, "eval_every": 3}
        )
    summary = train(cfg, log=lambda *_: None)
    assert summary["eval_loss"] is not None
    res = evaluate_run(tmp_path / "run", EvalOptions(batch_size=4, write=False))
    held = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert res["eval_loss"] == pytest.approx(held["eval_loss"], rel=1e-5)  # the very examples training scored
    if kind != "clm":
        assert res["examples"] == 8  # a quarter of 32, not all 32
    assert "eval_fraction split" in res["data"]
