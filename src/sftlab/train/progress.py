"""Training progress for a person watching: a rich bar on a terminal, plain lines anywhere else.

rich draws nothing when its stream is not a terminal, so a run piped to a log file would say nothing until it
ended. Off a terminal a plain line is printed instead:

    train: step 120/1000 (12%) loss 1.2345 lr 2.00e-04 5,321 tok/s elapsed 0:01:02 eta 0:09:05

at the first step, at every multiple of `every_steps`, at the first step that ends `every_s` seconds (30) or more after the
previous line, and at the last step. `every_steps` is max(log_every, 5% of the run): never more often than the
metrics rows, and about twenty lines by steps however long the run is; the clock adds a line at least every
30 s on a slow run (a line can only come at a step's end, so a single step longer than 30 s gives one per
step). tokens/s is the mean since the previous line; the ETA extrapolates this session's steps per second.
`train.progress: false` silences both.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress

PLAIN_EVERY_S = 30.0  # a plain line at least this often (at a step's end)
PLAIN_LINES = 20  # about this many plain lines by steps over a whole run


def plain_every_steps(total: int, log_every: int) -> int:
    """Steps between plain lines: no more often than metrics rows, about PLAIN_LINES over the run."""
    return max(1, log_every, math.ceil(total / PLAIN_LINES))


def _hms(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """`start`, `update` after each step with the run's cumulative tokens and training seconds, `stop`.

    `interactive=None` asks the stream (stdout) whether it is a terminal; `clock` is for tests."""

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        *,
        log_every: int = 1,
        every_s: float = PLAIN_EVERY_S,
        interactive: bool | None = None,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.enabled = enabled
        self.total = total
        self.every_steps = plain_every_steps(total, log_every)
        self.every_s = every_s
        self.stream = stream
        self.interactive = interactive
        self.clock = clock
        self._bar: _RichProgress | None = None
        self._task = None
        self._plain = False

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stdout  # looked up late: pytest swaps stdout

    def start(self, completed: int = 0) -> None:
        if not self.enabled:
            return
        tty = self.interactive if self.interactive is not None else self._out().isatty()
        if not tty:
            self._plain = True
            now = self.clock()
            self._t0, self._step0 = now, completed
            self._last = (now, completed, None, None)  # (clock, step, tokens, train seconds) at the last line
            return
        self._bar = _RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
            console=Console(file=self.stream) if self.stream is not None else None,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=completed, info="")
        self._prev: tuple[int, float] | None = None

    def update(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """After a step: `tokens` and `seconds` are the run's totals so far (real tokens, training time)."""
        if self._bar is not None:
            prev, self._prev = self._prev, (tokens, seconds)
            tps = (tokens - prev[0]) / (seconds - prev[1]) if prev and seconds > prev[1] else 0.0
            self._bar.update(self._task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")
        elif self._plain:
            now = self.clock()
            t_last, step_last, tok_last, sec_last = self._last
            due = (
                step_last == self._step0  # the first step: alive, and how fast
                or step >= self.total
                or step % self.every_steps == 0
                or now - t_last >= self.every_s
            )
            if due:
                self._line(step, loss, lr, tokens, seconds, now)

    def _line(self, step: int, loss: float, lr: float, tokens: int, seconds: float, now: float) -> None:
        _, _, tok_last, sec_last = self._last
        if tok_last is None or seconds <= sec_last:
            tps = tokens / seconds if seconds > 0 else 0.0  # the first line: this run's mean so far
        else:
            tps = (tokens - tok_last) / (seconds - sec_last)
        elapsed = now - self._t0
        done = step - self._step0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        pct = 100 * step / self.total if self.total else 100.0
        out = self._out()
        out.write(
            f"train: step {step}/{self.total} ({pct:.0f}%) loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
            f"elapsed {_hms(elapsed)} eta {_hms(eta) if math.isfinite(eta) else '?'}\n"
        )
        out.flush()  # a pipe is block-buffered: without this the line would wait for 8 KB of others
        self._last = (now, step, tokens, seconds)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._plain = False
