"""The UI's run-process manager: every action is an `sftlab` command in its own process.

A training run started from the browser is `python -m sftlab.cli.main train CONFIG key=value ... [--resume]`, the
command line a user would type, so it writes the same run directory and fails with the same `error: ...` line. Its
output goes to a log file the page tails; stopping it is a Ctrl-C (SIGINT), which makes the trainer save a
checkpoint that `--resume` continues from. `run_command` runs a short command (merge) to the end and returns its
output. No gradio here: the manager is tested without a browser.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .rundirs import RunView

CLI = [sys.executable, "-m", "sftlab.cli.main"]
MODES = ("start", "resume", "overwrite")
_MODE_FLAG = {"start": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}
INTERRUPTED = 130  # main()'s exit status after a Ctrl-C


def child_env() -> dict[str, str]:
    """The UI's environment, with output unbuffered so the log shows each step as it happens."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def restore_ctrl_c() -> None:
    """A process started in the background inherits SIGINT ignored, and so would every run it starts: Stop would
    then do nothing. Called once from the main thread (`sftlab ui`), it puts Python's Ctrl-C handler back."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train_argv(config: str | None, overrides: list[str], mode: str = "start") -> list[str]:
    """The `sftlab train` command line for a config file (optional) and dotted overrides."""
    if mode not in MODES:
        raise ConfigError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r}: expected key=value (e.g. train.lr=1e-4)")
    return [*CLI, "train", *([config] if config else []), *overrides, *_MODE_FLAG[mode]]


def shown(argv: list[str]) -> str:
    """The command as a user would type it: `sftlab ...` instead of the interpreter and module."""
    import shlex

    rest = argv[len(CLI) :] if argv[: len(CLI)] == CLI else argv
    return "sftlab " + shlex.join(rest)


@dataclass
class Job:
    """One `sftlab train` process and its log."""

    argv: list[str]
    output_dir: Path
    log_path: Path
    proc: subprocess.Popen
    started: float = field(default_factory=time.time)
    stop_requested: bool = False

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def status(self) -> str:
        rc = self.proc.poll()
        if rc is None:
            return "stopping" if self.stop_requested else "running"
        if rc == 0:
            return "finished"
        if rc == INTERRUPTED or (self.stop_requested and rc < 0):
            return "stopped"
        return f"failed (exit {rc})"

    def stop(self, grace_s: float = 30.0) -> str:
        """Ctrl-C the run (it saves a checkpoint and exits 130); if it has not left after `grace_s`, terminate it,
        then kill it. Returns the final status."""
        if not self.running:
            return self.status
        self.stop_requested = True
        for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return self.status

    def error_line(self) -> str | None:
        """The run's last `error: ...` line (the CLI prints a bad config, data or run dir as one)."""
        lines = [ln for ln in self.log_text(8000).splitlines() if ln.startswith("error: ")]
        return lines[-1] if lines else None

    def describe(self, view: RunView) -> str:
        """One status line for the page: what the process is doing, or how it ended, from its run directory."""
        status = self.status
        if self.running:
            step = view.train[-1]["step"] if view.train else None
            return status + (f": step {step}" if step is not None else ": loading data and model")
        if status == "stopped":
            ckpt = view.last_checkpoint
            if ckpt is None:
                return "stopped before its first checkpoint: Start begins again"
            return f"stopped at checkpoint step-{ckpt}: Resume continues from it"
        if status.startswith("failed"):
            return f"{status}: {self.error_line() or 'see the log'}"
        s = view.summary
        try:
            fresh = (view.path / "summary.json").stat().st_mtime >= self.started - 1
        except OSError:
            fresh = False
        if not (s and fresh):
            return f"{status}: no summary.json written"
        return f"{status}: {s.get('status')}, {s.get('steps')} steps, train loss {s.get('train_loss')}"

    def log_text(self, max_chars: int = 20_000) -> str:
        """The end of the log (progress lines, warnings, the final `completed: ...` or `error: ...` line)."""
        return read_tail(self.log_path, max_chars)


def read_tail(path: Path, max_chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_chars))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return text.replace("\r", "\n")  # tqdm's carriage returns would hide everything but the last bar


class JobManager:
    """At most one live `sftlab train` process per run directory; logs under `state_dir/logs/`."""

    def __init__(self, state_dir: str | Path, cwd: str | Path | None = None):
        self.state_dir = Path(state_dir)
        self.cwd = Path(cwd) if cwd is not None else Path.cwd()
        self.jobs: dict[Path, Job] = {}
        self._lock = threading.Lock()

    def log_path(self, output_dir: str | Path) -> Path:
        """One log per run directory, appended to by each start and resume."""
        resolved = (self.cwd / output_dir).resolve()
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(resolved)).strip("_")
        return self.state_dir / "logs" / f"{slug}.log"

    def start(self, config: str | None, overrides: list[str], output_dir: str, mode: str = "start") -> Job:
        """Launch `sftlab train`; refuses a second live run into the same directory."""
        argv = train_argv(config, overrides, mode)
        key = (self.cwd / output_dir).resolve()
        with self._lock:
            live = self.jobs.get(key)
            if live is not None and live.running:
                raise ConfigError(
                    f"train.output_dir: {output_dir} already has a run in progress; stop it first"
                )
            log = self.log_path(output_dir)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as f:
                f.write(f"$ {shown(argv)}\n".encode())
                f.flush()
                proc = subprocess.Popen(
                    argv,
                    cwd=self.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    env=child_env(),
                    start_new_session=True,  # a Ctrl-C in the UI's terminal stops the UI, not the runs
                )
            job = Job(argv, key, log, proc)
            self.jobs[key] = job
            return job

    def get(self, output_dir: str | Path) -> Job | None:
        return self.jobs.get((self.cwd / output_dir).resolve())

    def stop_all(self, grace_s: float = 30.0) -> None:
        for job in list(self.jobs.values()):
            job.stop(grace_s)


def run_command(args: list[str], cwd: str | Path | None = None, timeout_s: float = 3600) -> tuple[int, str]:
    """Run `sftlab ARGS...` to the end: (exit status, stdout and stderr together)."""
    done = subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_env(),
        timeout=timeout_s,
    )
    return done.returncode, done.stdout.decode("utf-8", errors="replace")
