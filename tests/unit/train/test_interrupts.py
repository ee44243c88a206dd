"""Ctrl-C: a press during a checkpoint write lets it finish (a second one abandons it, leaving nothing half
written), leftovers of an interrupted write are removed when the run restarts, and a Ctrl-C before training
exits 130 without a traceback (issue 16, item 7)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_config

import sftlab.train.checkpoint as checkpoint
from sftlab.cli.main import main
from sftlab.recipe import train
from sftlab.train.checkpoint import list_checkpoints, read_checkpoint
from sftlab.train.loop import Trainer

QUIET = dict(log=lambda *_: None)
MESSAGE = "press Ctrl-C again to abandon it"


def _ctrl_c_during_writes(monkeypatch, presses: int, at_step: int | None = None):
    """Send this process SIGINT `presses` times while the first checkpoint file (at `at_step`, or any) is written,
    as a user pressing Ctrl-C would; the write itself goes on."""
    real = checkpoint._write
    sent = {"n": 0}

    def write(path, data):
        step = int(path.parent.name.rsplit("-", 1)[1])
        if sent["n"] < presses and (at_step is None or step == at_step):
            for _ in range(presses):
                sent["n"] += 1
                os.kill(os.getpid(), signal.SIGINT)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "_write", write)
    return sent


def _interrupt_during_step(monkeypatch, step: int):
    real = Trainer._optimizer_step

    def stop(self):
        if self.state.step == step - 1:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stop)


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_second_ctrl_c_waits_for_the_interrupt_checkpoint(tmp_path, monkeypatch, capfd):
    cfg = make_config(tmp_path, train={"max_steps": 6})
    _interrupt_during_step(monkeypatch, 4)  # first Ctrl-C: the loop rewinds to step 3 and saves it
    sent = _ctrl_c_during_writes(monkeypatch, presses=1)  # second Ctrl-C, during that save
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    assert sent["n"] == 1
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-3"] and _leftovers(root) == []
    assert read_checkpoint(root / "step-3").step == 3  # complete: checksums verify
    assert f"saving checkpoint step-3, {MESSAGE}" in capfd.readouterr().err


def test_ctrl_c_during_a_periodic_save_finishes_it_then_stops(tmp_path, monkeypatch, capfd):
    cfg = make_config(tmp_path, train={"max_steps": 6, "save_every": 2})
    _ctrl_c_during_writes(monkeypatch, presses=1, at_step=4)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, **QUIET)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-2", "step-4"] and _leftovers(root) == []
    assert read_checkpoint(root / "step-4").step == 4
    assert capfd.readouterr().err.count(MESSAGE) == 1
    monkeypatch.undo()
    assert train(cfg, resume=True, **QUIET)["steps"] == 6


def test_second_ctrl_c_during_a_save_abandons_it_and_leaves_no_partial_dir(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, train={"max_steps": 6, "save_every": 2})
    _ctrl_c_during_writes(monkeypatch, presses=2, at_step=4)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=lines.append)
    assert "interrupted: checkpoint step-4 abandoned; --resume starts from the one before" in lines
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-2"] and _leftovers(root) == []


def test_leftovers_of_an_interrupted_write_are_removed_on_resume(tmp_path):
    cfg = make_config(tmp_path, train={"max_steps": 4, "save_every": 2})
    train(cfg, **QUIET)
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step-6").mkdir()  # as kill -9 during a write leaves it
    (root / ".tmp-step-6" / "trainable.safetensors").write_bytes(b"half")
    (root / ".tmp-old-step-4").mkdir()
    cfg.train.max_steps = 6
    lines: list[str] = []
    assert train(cfg, resume=True, log=lines.append)["steps"] == 6
    assert _leftovers(root) == []
    assert "removed .tmp-step-6, left by an interrupted checkpoint write" in lines


# -- Ctrl-C before training -----------------------------------------------------------------------------------


def test_ctrl_c_while_the_model_loads_exits_130_quietly(tmp_path, monkeypatch, capsys):
    import sftlab.hub

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sftlab.hub, "load_model", interrupted)
    cfg = make_config(tmp_path)
    rc = main(["train", f"train.output_dir={tmp_path / 'run'}", *_overrides(cfg)])
    assert rc == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_while_the_command_line_is_read_exits_130_quietly(monkeypatch, capsys):
    import sftlab.cli.main as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["train", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_the_entry_module_loads_nothing_outside_main():
    """A Ctrl-C while `sftlab.cli.main` itself is imported escapes main(): it must import nothing slow."""
    code = "import sys; b = set(sys.modules); import sftlab.cli.main; print(sorted(set(sys.modules) - b))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(eval(out)) <= {"__future__", "sftlab", "sftlab.cli", "sftlab.cli.main"}


def _overrides(cfg) -> list[str]:
    return [
        "model.name=tiny-llama",
        f"data.train={cfg.data.train}",
        "data.format=alpaca",
        "train.progress=false",
        "train.threads=1",
        "train.max_steps=2",
    ]


def test_the_libraries_are_imported_with_ctrl_c_as_a_quiet_exit():
    """Ctrl-C inside numpy's/torch's C-extension start-up leaves them half-loaded (a traceback from transformers'
    lazy loader, not a KeyboardInterrupt): the CLI imports them first, with SIGINT meaning exit 130 at once."""
    code = """
import os, signal, sys, builtins
real = builtins.__import__
def hooked(name, *a, **k):
    if name == "torch" and "torch" not in sys.modules:
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "torch imported unshielded"
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *a, **k)
builtins.__import__ = hooked
from sftlab.cli.main import main
sys.exit(main(["train", "no-such-config.yaml"]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "interrupted\n"
