"""--resume needs a checkpoint (item 11: it used to train from scratch silently), --resume-or-start resumes or
starts and says which, and resuming a finished run does not evaluate its last step twice (item 13)."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import make_config

from sftlab.cli.main import main
from sftlab.errors import RunDirError
from sftlab.recipe import train
from sftlab.train.loop import Trainer


def _log(lines: list[str]):
    return lambda msg: lines.append(str(msg))


def test_resume_with_no_run_refuses_and_writes_nothing(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(RunDirError) as e:
        train(cfg, resume=True, log=_log([]))
    assert f"there is no checkpoint in {tmp_path / 'run' / 'checkpoints'}" in str(e.value)
    assert "drop --resume" in str(e.value) and "--resume-or-start" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_run_that_wrote_no_checkpoint_refuses_and_leaves_it(tmp_path):
    cfg = make_config(tmp_path, train={"max_steps": 2})  # no save_every: final/ only
    train(cfg, log=_log([]))
    before = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(RunDirError, match="finished without writing checkpoints"):
        train(cfg, resume=True, log=_log([]))
    assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == before


def test_resume_or_start_starts_then_resumes_and_says_which(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, train={"max_steps": 4, "save_every": 1})
    real = Trainer._optimizer_step

    def stop_in_step_3(self):
        if self.state.step == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_in_step_3)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume_or_start=True, log=_log(lines))
    assert (
        f"--resume-or-start: no checkpoint, starting a new run in {tmp_path / 'run' / 'checkpoints'}" in lines
    )
    monkeypatch.undo()
    lines.clear()
    summary = train(cfg, resume_or_start=True, log=_log(lines))
    assert f"--resume-or-start: resuming from {tmp_path / 'run' / 'checkpoints'}" in lines
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert any(
        line.startswith(f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step-2'}") for line in lines
    )


def test_resume_or_start_restarts_a_run_stopped_before_its_first_checkpoint(tmp_path, monkeypatch):
    cfg = make_config(tmp_path, train={"max_steps": 2, "save_every": 2})

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, log=_log([]))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert (run / "config.yaml").exists()
    # as kill -9 during the first checkpoint write leaves it: the write's temp dir only
    (run / "checkpoints" / "step-0").rename(run / "checkpoints" / ".tmp-step-0")
    with pytest.raises(RunDirError, match="stopped before its first checkpoint was complete"):
        train(cfg, resume=True, log=_log([]))
    assert train(cfg, resume_or_start=True, log=_log([]))["status"] == "completed"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]


def test_resume_or_start_refuses_to_replace_a_finished_run(tmp_path):
    cfg = make_config(tmp_path, train={"max_steps": 2})
    train(cfg, log=_log([]))
    with pytest.raises(RunDirError, match="holds a finished run .* pass --overwrite"):
        train(cfg, resume_or_start=True, log=_log([]))


def test_cli_resume_or_start_and_exclusive_modes(tmp_path, capsys):
    cfg = make_config(tmp_path, train={"max_steps": 2, "save_every": 2})
    args = [
        "train",
        "model.name=tiny-llama",
        f"data.train={cfg.data.train}",
        "data.format=alpaca",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
        "train.save_every=2",
        "train.progress=false",
        "train.threads=1",
    ]
    assert main([*args, "--resume"]) == 2
    assert "--resume: there is no checkpoint in" in capsys.readouterr().err
    assert main([*args, "--resume-or-start"]) == 0
    assert "no checkpoint, starting a new run" in capsys.readouterr().out
    assert main([*args, "--resume-or-start"]) == 0
    assert "--resume-or-start: resuming from" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([*args, "--resume", "--overwrite"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# -- 13. one eval row per step --------------------------------------------------------------------------------


def _eval_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "eval_loss" in r]


def test_resume_from_the_final_checkpoint_does_not_evaluate_again(tmp_path):
    cfg = make_config(
        tmp_path,
        train={"max_steps": 4, "eval_every": 2, "save_every": 2, "keep_last": 1},
        data={"eval_fraction": 0.25},
    )
    first = train(cfg, log=_log([]))
    run = tmp_path / "run"
    assert _eval_steps(run) == [2, 4]
    metrics = (run / "metrics.jsonl").read_text()
    again = train(cfg, resume=True, log=_log([]))
    assert again["status"] == "completed" and again["steps"] == 4
    steps = _eval_steps(run)
    assert steps == [2, 4] and max(Counter(steps).values()) == 1
    assert (run / "metrics.jsonl").read_text() == metrics
    assert again["eval_loss"] == first["eval_loss"]
