"""Self-supervised runs end to end (issue 18 item 1): each objective trains through `sftlab train`'s recipe, MLM's
per-epoch masking resumes bit-identically, and an MLM model's body carries into a seq-cls model without its head."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sftlab.config import build_config
from sftlab.recipe import prepare, train
from sftlab.train.loop import Trainer

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]


def corpus(path: Path, n: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(f"the {WORDS[i % 10]} {WORDS[(3 * i) % 10]} sat by the {WORDS[(7 * i) % 10]}"
                              for i in range(n)) + "\n")  # fmt: skip
    return path


def ssl_config(tmp: Path, model: str, objective: str, **train_keys):
    return build_config({
        "model": {"name": model},
        "data": {"train": str(corpus(tmp / "corpus.txt")), "max_length": 24, "eval_fraction": 0.2},
        "train": {"objective": objective, "output_dir": str(tmp / "run"), "max_steps": 6, "batch_size": 4,
                  "lr": 1e-3, "schedule": "constant", "progress": False, "threads": 1, **train_keys},
    })  # fmt: skip


def _quiet(msg):
    pass


@pytest.mark.parametrize(
    "model,objective", [("tiny-llama", "clm"), ("tiny-bert", "mlm"), ("tiny-t5", "span")]
)
def test_each_objective_trains_evaluates_and_saves(tmp_path, model, objective):
    cfg = ssl_config(tmp_path, model, objective, eval_every=3, max_steps=12)
    summary = train(cfg, log=_quiet)
    assert summary["status"] == "completed"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert [r["eval_loss"] > 0 for r in rows if "eval_loss" in r] == [True] * 4
    info = json.loads((tmp_path / "run" / "final" / "sftlab.json").read_text())
    assert info["task"] == cfg.model.task


def _stop_at(step: int):
    real = Trainer._optimizer_step

    def stop(self):
        if self.state.step == step:
            raise KeyboardInterrupt
        return real(self)

    return stop


def test_mlm_masking_redrawn_per_epoch_resumes_bit_identically(tmp_path, monkeypatch):
    keys = {"max_steps": 9, "save_every": 2, "batch_size": 8}  # 3 batches an epoch: three epochs of masks
    whole = train(ssl_config(tmp_path / "a", "tiny-bert", "mlm", **keys), log=_quiet)
    cfg = ssl_config(tmp_path / "b", "tiny-bert", "mlm", **keys)
    monkeypatch.setattr(Trainer, "_optimizer_step", _stop_at(5))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=_quiet)
    monkeypatch.undo()
    resumed = train(cfg, resume=True, log=_quiet)
    assert resumed["train_loss"] == whole["train_loss"]
    a = load_file(tmp_path / "a" / "run" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_mlm_model_loads_as_a_classifier_with_its_body_and_without_its_head(tmp_path):
    train(ssl_config(tmp_path, "tiny-bert", "mlm"), log=_quiet)
    final = tmp_path / "run" / "final"
    mlm = load_file(final / "model.safetensors")
    assert any(k.startswith("cls.") for k in mlm)
    rows = tmp_path / "cls.jsonl"
    rows.write_text(
        "".join(json.dumps({"text": f"{w} thing", "label": i % 2}) + "\n" for i, w in enumerate(WORDS))
    )
    sft = build_config({"model": {"name": str(final), "task": "seq-cls"}, "data": {"train": str(rows),
                        "format": "classification"}, "train": {"output_dir": str(tmp_path / "sft")}})  # fmt: skip
    model = prepare(sft, log=_quiet)[0]
    state = model.state_dict()
    assert not any(k.startswith("cls.") for k in state) and "classifier.weight" in state
    body = [k for k in mlm if k.startswith("bert.")]
    assert len(body) > 20 and all(torch.equal(state[k], mlm[k]) for k in body)
    base = prepare(
        build_config({**sft.model_dump(), "model": {"name": "tiny-bert", "task": "seq-cls"}}), _quiet
    )[0]
    assert not torch.equal(
        base.state_dict()[body[0]], mlm[body[0]]
    )  # the body is the trained one, not the base


@pytest.mark.parametrize(
    "model,objective", [("tiny-llama", "clm"), ("tiny-bert", "mlm"), ("tiny-t5", "span")]
)
def test_sftlab_eval_scores_a_self_supervised_run_as_its_evals_did(tmp_path, model, objective, capsys):
    from sftlab.cli.main import main

    held = corpus(tmp_path / "held.txt", 8)
    cfg = ssl_config(tmp_path, model, objective, eval_every=6)
    cfg.data.eval_fraction, cfg.data.eval = 0.0, str(held)
    summary = train(cfg, log=_quiet)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--batch-size", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert res["eval_tokens"] == summary["eval_tokens"]
