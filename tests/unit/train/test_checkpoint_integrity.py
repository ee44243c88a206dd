"""Checkpoints carry a sha256 per file and are read only when they verify: a damaged newest checkpoint makes
resume fall back to the newest good one (and say so), with the same final weights as an uninterrupted run; with
none good, one error naming the files. Non-finite weights are never written, and a diverged run names a
checkpoint that really is good (issue 16, items 5 and 6)."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import file_tree, make_config
from safetensors.torch import load_file, save_file

from sftlab.cli.main import main
from sftlab.errors import CheckpointError
from sftlab.recipe import train
from sftlab.train.checkpoint import (
    CHECKSUMS_FILE,
    OPTIM_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    list_checkpoints,
    read_checkpoint,
)
from sftlab.train.loop import Trainer
from sftlab.train.objective import Objective

TRAIN = {"max_steps": 6, "save_every": 2, "keep_last": 3, "schedule": "cosine", "warmup_steps": 2}


def _quiet(lines: list[str]):
    return lambda msg: lines.append(str(msg))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of the run, uninterrupted."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = make_config(tmp, train=TRAIN)
    assert train(cfg, log=_quiet([]))["status"] == "completed"
    return load_file(str(tmp / "run" / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The same run stopped (Ctrl-C) during step 5: checkpoints step-2 and step-4, no final/."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = make_config(tmp, train=TRAIN)
    real = Trainer._optimizer_step

    def interrupt_in_step_5(self):
        if self.state.step == 4:
            raise KeyboardInterrupt
        return real(self)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "_optimizer_step", interrupt_in_step_5)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, log=_quiet([]))
    finally:
        mp.undo()
    assert [p.name for p in list_checkpoints(tmp / "run" / "checkpoints")] == ["step-2", "step-4"]
    return cfg, tmp / "run"


def _copy(stopped_run, tmp_path):
    cfg, run = stopped_run
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    cfg = cfg.model_copy(deep=True)
    cfg.train.output_dir = str(dest)
    return cfg, dest


def test_every_checkpoint_file_has_its_sha256(stopped_run):
    _, run = stopped_run
    for ckpt in list_checkpoints(run / "checkpoints"):
        sums = json.loads((ckpt / CHECKSUMS_FILE).read_text())["sha256"]
        assert set(sums) == {WEIGHTS_FILE, OPTIM_FILE, STATE_FILE}
        for name, digest in sums.items():
            assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest


# -- damage to the newest checkpoint, as found by hand: each must fall back to step-2 --------------------------


def _flip_weight_bytes(ckpt: Path) -> str:
    f = ckpt / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for i in range(header + 100, header + 140):  # inside the first tensor's data
        data[i] ^= 0x40
    f.write_bytes(bytes(data))
    return f"{WEIGHTS_FILE}: sha256 does not match"


def _truncate_weights(ckpt: Path) -> str:
    f = ckpt / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f"{WEIGHTS_FILE}: sha256 does not match"


def _edit_step(ckpt: Path) -> str:
    f = ckpt / STATE_FILE
    state = json.loads(f.read_text())
    state["step"] = 5
    f.write_text(json.dumps(state))
    return f"{STATE_FILE}: sha256 does not match"


def _break_state_json(ckpt: Path) -> str:
    (ckpt / STATE_FILE).write_text('{"step": 4, "optimizer"')
    return f"{STATE_FILE}: sha256 does not match"


def _drop_optimizer(ckpt: Path) -> str:
    (ckpt / OPTIM_FILE).unlink()
    return f"{OPTIM_FILE}: missing or unreadable"


def _garble_checksums(ckpt: Path) -> str:
    (ckpt / CHECKSUMS_FILE).write_text("{not json")
    return f"{CHECKSUMS_FILE}: unreadable"


def _legacy_with_nan_weights(ckpt: Path) -> str:
    """No checksums (as an older sftlab wrote) and NaN weights (as an older sftlab kept after divergence)."""
    (ckpt / CHECKSUMS_FILE).unlink()
    w = load_file(str(ckpt / WEIGHTS_FILE))
    w = {k: torch.full_like(v, float("nan")) for k, v in w.items()}
    save_file(w, str(ckpt / WEIGHTS_FILE))
    return f"{WEIGHTS_FILE}: {len(w)} tensors hold NaN/inf"


def _legacy_truncated(ckpt: Path) -> str:
    (ckpt / CHECKSUMS_FILE).unlink()
    f = ckpt / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:100])
    return f"{WEIGHTS_FILE}: not a readable safetensors file"


DAMAGE = [
    _flip_weight_bytes,
    _truncate_weights,
    _edit_step,
    _break_state_json,
    _drop_optimizer,
    _garble_checksums,
    _legacy_with_nan_weights,
    _legacy_truncated,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_resume_falls_back_to_the_newest_good_checkpoint(stopped_run, reference, tmp_path, damage):
    cfg, run = _copy(stopped_run, tmp_path)
    why = damage(run / "checkpoints" / "step-4")
    lines: list[str] = []
    summary = train(cfg, resume=True, log=_quiet(lines))
    log = "\n".join(lines)
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert f"skipping checkpoint step-4: {run / 'checkpoints' / 'step-4'}" in log and why in log
    assert f"resumed from {run / 'checkpoints' / 'step-2'} (step 2" in log
    got = load_file(str(run / "final" / "model.safetensors"))
    for k in reference:
        assert torch.equal(reference[k], got[k]), k
    # the damaged step-4 was replaced by the replayed one, which verifies
    assert read_checkpoint(run / "checkpoints" / "step-4").step == 4


def test_no_checkpoint_that_verifies_is_one_error_naming_the_files(stopped_run, tmp_path, capsys):
    cfg, run = _copy(stopped_run, tmp_path)
    _flip_weight_bytes(run / "checkpoints" / "step-4")
    _break_state_json(run / "checkpoints" / "step-2")
    before = file_tree(run)
    with pytest.raises(CheckpointError) as e:
        train(cfg, resume=True, log=_quiet([]))
    msg = str(e.value)
    assert str(run / "checkpoints" / "step-4" / WEIGHTS_FILE) in msg
    assert str(run / "checkpoints" / "step-2" / STATE_FILE) in msg
    assert file_tree(run) == before  # nothing rewritten, not even config.yaml

    overrides = [f"train.output_dir={run}", "train.progress=false"]
    (tmp_path / "cfg.yaml").write_text((run / "config.yaml").read_text())
    assert main(["train", str(tmp_path / "cfg.yaml"), *overrides, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint in") and "Traceback" not in err
    assert file_tree(run) == before


def test_a_checkpoint_from_before_checksums_resumes_with_a_note(stopped_run, reference, tmp_path):
    cfg, run = _copy(stopped_run, tmp_path)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / CHECKSUMS_FILE).unlink()
    lines: list[str] = []
    assert train(cfg, resume=True, log=_quiet(lines))["status"] == "completed"
    assert f"note: step-4 has no {CHECKSUMS_FILE}" in "\n".join(lines)
    got = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(reference[k], got[k]) for k in reference)


def test_a_checkpoint_with_another_step_than_its_name_is_refused(stopped_run, tmp_path):
    _, run = _copy(stopped_run, tmp_path)
    ckpt = run / "checkpoints" / "step-4"
    (ckpt / CHECKSUMS_FILE).unlink()
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["step"] = 5
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"trainer_state.json: step is 5, the directory says 4"):
        read_checkpoint(ckpt)


# -- 6. finiteness ------------------------------------------------------------------------------------------


def test_non_finite_weights_are_never_written_and_the_run_says_no_checkpoint_is_good(tmp_path):
    # lr 1e38: after the first update every weight is inf/NaN while that step's loss was still finite
    cfg = make_config(tmp_path, train={"lr": 1e38, "max_steps": 4, "save_every": 1})
    summary = train(cfg, log=_quiet([]))
    assert summary["status"] == "diverged"
    assert "not writing checkpoint step-1" in summary["error"]
    assert "No good checkpoint" in summary["error"]
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "final").exists()


def test_divergence_names_a_checkpoint_that_is_good(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, train={"max_steps": 6, "save_every": 1, "keep_last": 3})
    root = tmp_path / "run" / "checkpoints"
    real = Objective.forward
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        if calls["n"] == 4:  # also damage step-3 on disk: the message must name step-2, which is good
            (root / "step-3" / WEIGHTS_FILE).write_bytes(b"garbage")
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(Objective, "forward", poisoned)
    summary = train(cfg, log=_quiet([]))
    assert summary["status"] == "diverged" and "loss is nan at step 4" in summary["error"]
    assert f"The newest good checkpoint is {root / 'step-2'} (step 2)" in summary["error"]


def test_flat_loss_at_an_extreme_lr_is_a_warning_in_log_summary_and_metrics(tmp_path):
    # lr 1e6 sends tiny-llama to the uniform distribution: loss ln(260) on every batch, and the run "completes"
    cfg = make_config(tmp_path / "hot", train={"lr": 1e6, "max_steps": 12})
    lines: list[str] = []
    summary = train(cfg, log=_quiet(lines))
    assert summary["status"] == "completed"
    assert len(summary["warnings"]) == 1 and "the loss has not moved for 10 steps" in summary["warnings"][0]
    assert "lr 1e+06" in summary["warnings"][0] and "try a lower train.lr" in summary["warnings"][0]
    assert any(line.startswith("warning: the loss has not moved") for line in lines)
    rows = [json.loads(x) for x in (tmp_path / "hot" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["warning"] for r in rows if "warning" in r] == summary["warnings"]

    sane = make_config(tmp_path / "sane", train={"max_steps": 12})
    assert train(sane, log=_quiet([]))["warnings"] == []
