"""A real Ctrl-C (SIGINT to this process) between a step's optimizer update and the end of that step (its count,
its metrics row) is held until the step is complete: the interrupt checkpoint's step is the number of updates the
weights hold, metrics.jsonl has every step's row, and resuming ends on the uninterrupted run's weights bit for bit.
A Ctrl-C elsewhere in the step still stops it at once, rewound to its start (train/interrupt.py)."""

import json
import os
import signal

import pytest
import torch
from helpers import make_config
from safetensors.torch import load_file

from sftlab.recipe import train
from sftlab.train.callbacks import MetricsCallback
from sftlab.train.checkpoint import list_checkpoints, read_checkpoint
from sftlab.train.loop import Trainer
from sftlab.train.objective import Objective

QUIET = dict(log=lambda *_: None)
STEPS, AT = 6, 3  # Ctrl-C lands in step AT


def _cfg(root):
    return make_config(
        root,
        train={"max_steps": STEPS, "schedule": "cosine", "warmup_steps": 1, "output_dir": str(root / "run")},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final weights."""
    root = tmp_path_factory.mktemp("straight")
    assert train(_cfg(root), **QUIET)["steps"] == STEPS
    return load_file(str(root / "run" / "final" / "model.safetensors"))


def _ctrl_c(presses: int = 1) -> None:
    for _ in range(presses):
        os.kill(os.getpid(), signal.SIGINT)


def _in_the_update(monkeypatch, presses: int = 1) -> dict:
    """SIGINT right after step AT's real optimizer update; counts the updates applied."""
    real = Trainer._optimizer_step
    applied = {"n": 0}

    def step(self):
        out = real(self)
        applied["n"] += 1
        if applied["n"] == AT:
            _ctrl_c(presses)
        return out

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    return applied


def _as_callbacks_start(monkeypatch) -> dict:
    """SIGINT as step AT's callbacks begin (the update applied and counted, its metrics row not yet written)."""
    real_step, real_cb = Trainer._optimizer_step, MetricsCallback.on_step_end
    applied = {"n": 0}

    def step(self):
        applied["n"] += 1
        return real_step(self)

    def on_step_end(self, trainer, result):
        if trainer.state.step == AT:
            _ctrl_c()
        return real_cb(self, trainer, result)

    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    monkeypatch.setattr(MetricsCallback, "on_step_end", on_step_end)
    return applied


def _loss_steps(run) -> list[int]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["step"] for r in rows if "loss" in r]


@pytest.mark.parametrize("where", ["in_the_update", "as_callbacks_start"])
def test_ctrl_c_after_the_update_saves_that_step_and_resumes_bit_identical(
    tmp_path, monkeypatch, capfd, reference, where
):
    cfg = _cfg(tmp_path)
    applied = {"in_the_update": _in_the_update, "as_callbacks_start": _as_callbacks_start}[where](monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    run = tmp_path / "run"
    ckpts = list_checkpoints(run / "checkpoints")
    assert applied["n"] == AT
    # (a) the interrupt checkpoint is labelled with the number of updates its weights hold
    assert [p.name for p in ckpts] == [f"step-{AT}"]
    assert read_checkpoint(ckpts[-1]).step == applied["n"]
    # (b) every finished step logged its row
    assert _loss_steps(run) == list(range(1, AT + 1))
    assert f"finishing step {AT}" in capfd.readouterr().err

    monkeypatch.undo()
    assert train(cfg, resume=True, **QUIET)["steps"] == STEPS
    assert _loss_steps(run) == list(range(1, STEPS + 1))
    # (c) resume continues exactly where the weights are
    got = load_file(str(run / "final" / "model.safetensors"))
    assert reference.keys() == got.keys()
    for k in reference:
        assert torch.equal(reference[k], got[k]), k


def test_a_second_ctrl_c_in_the_update_stops_once_the_step_is_counted(tmp_path, monkeypatch, reference):
    """Two presses in the update: the run stops before the step's callbacks, but never with the update uncounted."""
    cfg = _cfg(tmp_path)
    applied = _in_the_update(monkeypatch, presses=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-{AT}"]
    assert read_checkpoint(ckpts[-1]).step == applied["n"] == AT
    monkeypatch.undo()
    train(cfg, resume=True, **QUIET)
    got = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for k in reference:
        assert torch.equal(reference[k], got[k]), k


def test_ctrl_c_before_the_update_still_stops_at_once_and_rewinds(tmp_path, monkeypatch):
    """Holding Ctrl-C is limited to the step's end: one in a forward pass stops the step there (no update applied),
    and the checkpoint is the step before."""
    cfg = _cfg(tmp_path)
    real_fwd, real_step = Objective.forward, Trainer._optimizer_step
    seen = {"fwd": 0, "updates": 0}

    def forward(self, batch):
        seen["fwd"] += 1
        if seen["fwd"] == AT:  # grad_accum 1: the forward of step AT
            _ctrl_c()
        return real_fwd(self, batch)

    def step(self):
        seen["updates"] += 1
        return real_step(self)

    monkeypatch.setattr(Objective, "forward", forward)
    monkeypatch.setattr(Trainer, "_optimizer_step", step)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    assert signal.getsignal(signal.SIGINT) is before  # the loop's handler is gone with the loop
    assert seen["updates"] == AT - 1
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-{AT - 1}"]
    assert _loss_steps(tmp_path / "run") == list(range(1, AT))
