import json

import pytest
import torch
from helpers import interrupt_after, make_config
from safetensors.torch import load_file

from sftlab.recipe import prepare, train
from sftlab.train.checkpoint import list_checkpoints
from sftlab.train.loop import Trainer
from sftlab.train.objective import Objective


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_accumulation_4x2_equals_batch_8(tmp_path):
    cfg = make_config(tmp_path, "tiny-llama", train={"batch_size": 8})
    model, tok, data, _ = prepare(cfg, log=lambda *_: None)
    model.train()
    from sftlab.data.batching import collate

    ex = data.examples[:8]
    t = Trainer(
        model=model, cfg=cfg.train, task="causal-lm", train_examples=data.examples, pad_id=0, run_dir=tmp_path
    )
    loss_big, n_big, _ = t.train_step([collate(ex, 0, "causal-lm")])
    g_big = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss_acc, n_acc, _ = t.train_step([collate(ex[i : i + 2], 0, "causal-lm") for i in range(0, 8, 2)])
    assert n_big == n_acc
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_big[n], rtol=1e-4, atol=1e-6)


# GPT-2 has dropout: resume must restore the RNG too; Llama runs its Linear layers through oneDNN (gemm.py)
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_resume_is_bit_identical(tmp_path, model_name, monkeypatch):
    straight = make_config(
        tmp_path / "a",
        model_name,
        train={
            "max_steps": 10,
            "batch_size": 4,
            "grad_accum": 2,
            "schedule": "cosine",
            "warmup_steps": 2,
            "output_dir": str(tmp_path / "a" / "run"),
        },
    )
    train(straight)
    ref = load_file(str(tmp_path / "a" / "run" / "final" / "model.safetensors"))

    cfg = straight.model_copy(deep=True)
    cfg.train.output_dir = str(tmp_path / "b")
    real_step = interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-5"]
    assert not (tmp_path / "b" / "final").exists()
    monkeypatch.setattr(Trainer, "_optimizer_step", real_step)
    summary = train(cfg, resume=True)
    assert summary["steps"] == 10
    got = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    steps = [
        r["step"]
        for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert steps == list(range(1, 11))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 6, "save_every": 1, "keep_last": 3})
    real = Objective.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        return out._replace(loss=out.loss * float("nan")) if calls["n"] == 4 else out

    monkeypatch.setattr(Objective, "forward", poisoned)
    summary = train(cfg)
    assert summary["status"] == "diverged" and "loss is nan" in summary["error"]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        "step-1",
        "step-2",
        "step-3",
    ]
    assert not (tmp_path / "run" / "final").exists()
    w = load_file(str(tmp_path / "run" / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())


def test_checkpoint_keep_last_and_no_partial_dirs(tmp_path):
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 6, "save_every": 2, "keep_last": 2})
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]


def test_run_dir_outputs(tmp_path):
    cfg = make_config(
        tmp_path, "tiny-llama", train={"max_steps": 4, "eval_every": 2}, data={"eval_fraction": 0.25}
    )
    summary = train(cfg)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "summary.json",
        "final/config.json",
        "final/model.safetensors",
        "final/tokenizer.json",
    ):
        assert (run / name).exists(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4]
    assert summary["status"] == "completed" and summary["tokens_per_s"] > 0


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = make_config(tmp_path, "tiny-llama", train={"max_steps": 2})
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_early_stopping(tmp_path):
    # lr so high the eval loss cannot keep improving; patience 1 stops well before max_steps.
    cfg = make_config(
        tmp_path,
        "tiny-llama",
        train={
            "max_steps": 40,
            "eval_every": 1,
            "lr": 0.5,
            "early_stopping_patience": 1,
            "max_grad_norm": None,
        },
        data={"eval_fraction": 0.25},
    )
    summary = train(cfg)
    assert summary["status"] == "early-stopped" and summary["steps"] < 40


def test_gradient_checkpointing_run_matches_plain_run(tmp_path):
    plain = make_config(
        tmp_path / "a", "tiny-llama", train={"max_steps": 3, "output_dir": str(tmp_path / "a" / "run")}
    )
    ckpt = make_config(
        tmp_path / "b",
        "tiny-llama",
        train={"max_steps": 3, "output_dir": str(tmp_path / "b" / "run"), "gradient_checkpointing": True},
    )
    ref, got = train(plain), train(ckpt)
    assert got["status"] == "completed"
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
