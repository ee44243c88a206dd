"""The UI's run-process manager: a run started from the page is `sftlab train` in a subprocess, writes the same run
directory as the CLI, stops with a checkpoint on Stop (Ctrl-C) and continues on Resume; merge is `sftlab merge`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from helpers import make_config

from sftlab.cli.main import main
from sftlab.config import save_config
from sftlab.errors import ConfigError
from sftlab.ui import jobs
from sftlab.ui.rundirs import load_view, read_metrics


def _yaml(tmp_path: Path, name: str, **train) -> tuple[Path, Path]:
    """A tiny-llama config file writing to tmp_path/name; returns (config, run dir)."""
    cfg = make_config(tmp_path / "data", method={"name": "lora", "r": 4},
                      train={"output_dir": str(tmp_path / name), **train})  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    save_config(cfg, path)
    return path, Path(cfg.train.output_dir)


def _wait(job: jobs.Job, timeout: float = 120) -> None:
    try:
        job.proc.wait(timeout)
    except Exception:
        job.proc.kill()
        raise AssertionError(job.log_text()) from None


def test_train_argv_is_the_cli_command_line():
    argv = jobs.train_argv("c.yaml", ["train.lr=1e-3"], "resume")
    assert argv[:3] == jobs.CLI and argv[3:] == ["train", "c.yaml", "train.lr=1e-3", "--resume"]
    assert jobs.shown(argv) == "sftlab train c.yaml train.lr=1e-3 --resume"
    assert jobs.train_argv(None, ["model.name=tiny-llama"], "overwrite")[-2:] == [
        "model.name=tiny-llama",
        "--overwrite",
    ]
    with pytest.raises(ConfigError, match="override 'lr': expected key=value"):
        jobs.train_argv("c.yaml", ["lr"])
    with pytest.raises(ConfigError, match="mode: 'restart' is not one of start, resume, overwrite"):
        jobs.train_argv("c.yaml", [], "restart")


def test_a_run_started_by_the_manager_equals_the_cli_run(tmp_path):
    cfg, run = _yaml(tmp_path, "ui-run", max_steps=4)
    manager = jobs.JobManager(tmp_path / "state", cwd=tmp_path)
    job = manager.start(str(cfg), [], str(run))
    _wait(job)
    assert job.status == "finished", job.log_text()
    assert job.log_text().startswith(f"$ sftlab train {cfg}\n") and "completed: 4 steps" in job.log_text()
    assert job.log_path == manager.log_path(run) and job.log_path.is_relative_to(tmp_path / "state" / "logs")

    cli_cfg, cli_run = _yaml(tmp_path, "cli-run", max_steps=4)
    assert main(["train", str(cli_cfg)]) == 0
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(run) == files(cli_run)
    ui_loss = [r["loss"] for r in read_metrics(run)[0]]
    assert ui_loss == [r["loss"] for r in read_metrics(cli_run)[0]] and len(ui_loss) == 4
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == (
        cli_run / "final" / "adapter_model.safetensors"
    ).read_bytes()


def test_stop_saves_a_checkpoint_and_resume_continues_from_it(tmp_path):
    jobs.restore_ctrl_c()  # as `sftlab ui` does: runs must not inherit an ignored SIGINT
    cfg, run = _yaml(tmp_path, "run", max_steps=40, batch_size=2)
    manager = jobs.JobManager(tmp_path / "state", cwd=tmp_path)
    job = manager.start(str(cfg), [], str(run))
    with pytest.raises(ConfigError, match="already has a run in progress"):
        manager.start(str(cfg), [], str(run))
    deadline = time.time() + 120
    while len(read_metrics(run)[0]) < 3:
        assert job.running and time.time() < deadline, job.log_text()
        time.sleep(0.1)
    assert job.describe(load_view(run)).startswith("running: step ")
    assert job.stop() == "stopped" and job.proc.returncode == jobs.INTERRUPTED
    saved = [int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")]
    assert len(saved) == 1 and 3 <= saved[0] < 40, saved
    assert f"interrupted: checkpoint saved to {run}/checkpoints/step-{saved[0]}" in job.log_text()
    assert load_view(run).status == "unfinished" and load_view(run).last_checkpoint == saved[0]
    assert job.describe(load_view(run)) == f"stopped at checkpoint step-{saved[0]}: Resume continues from it"

    again = manager.start(str(cfg), [], str(run), mode="resume")
    _wait(again)
    assert again.status == "finished", again.log_text()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    steps = [r["step"] for r in read_metrics(run)[0]]
    # every step after the checkpoint once, none repeated (a Ctrl-C between a step and its metrics row can lose
    # that row before the checkpoint: a trainer issue, not the manager's)
    assert [s for s in steps if s > saved[0]] == list(range(saved[0] + 1, 41)) and steps == sorted(set(steps))
    log = again.log_text()
    assert log.count("$ sftlab train") == 2 and f"{cfg} --resume" in log  # one log for the run, both launches


def test_a_failing_run_reports_the_cli_error(tmp_path):
    manager = jobs.JobManager(tmp_path / "state", cwd=tmp_path)
    job = manager.start(None, ["model.name=tiny-llama", f"data.train={tmp_path}/missing.jsonl",
                               f"train.output_dir={tmp_path}/run"], str(tmp_path / "run"))  # fmt: skip
    _wait(job)
    assert job.status == "failed (exit 2)"
    assert job.error_line().startswith("error: ") and "missing.jsonl" in job.error_line()
    assert job.describe(load_view(tmp_path / "run")) == f"failed (exit 2): {job.error_line()}"


def test_a_second_start_into_a_finished_run_says_why_it_failed(tmp_path):
    cfg, run = _yaml(tmp_path, "run", max_steps=2)
    manager = jobs.JobManager(tmp_path / "state", cwd=tmp_path)
    first = manager.start(str(cfg), [], str(run))
    _wait(first)
    assert first.describe(load_view(run)).startswith("finished: completed, 2 steps, train loss ")
    again = manager.start(str(cfg), [], str(run))  # neither --resume nor --overwrite
    _wait(again)
    shown = again.describe(load_view(run))  # not the earlier run's summary
    assert shown.startswith("failed (exit 2): error: ") and "--overwrite" in shown, again.log_text()


def test_restore_ctrl_c_undoes_an_inherited_ignore():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        jobs.restore_ctrl_c()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, old)


def test_merge_runs_the_cli(tmp_path):
    cfg, run = _yaml(tmp_path, "run", max_steps=2)
    assert main(["train", str(cfg)]) == 0
    rc, out = jobs.run_command(["merge", str(run), str(tmp_path / "merged")], cwd=tmp_path)
    assert rc == 0 and "merged model written to" in out
    assert (tmp_path / "merged" / "config.json").is_file()
    rc, out = jobs.run_command(["merge", str(run), str(tmp_path / "merged")], cwd=tmp_path)
    last = out.strip().splitlines()[-1]  # (a library may print a warning of its own before)
    assert rc == 2 and last.startswith("error: ") and "--force" in last


def test_read_tail_shows_progress_bars_as_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"a" * 50 + b"\nbar 1%\rbar 50%\rbar 100%\n")
    assert jobs.read_tail(log, 30).splitlines()[-3:] == ["bar 1%", "bar 50%", "bar 100%"]
    assert jobs.read_tail(tmp_path / "none.log", 10) == ""
