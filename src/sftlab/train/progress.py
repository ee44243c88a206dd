"""A rich progress bar with loss, lr and tokens/s; silent when disabled or not a terminal."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self._bar: _RichProgress | None = None
        self._task = None

    def start(self, completed: int = 0) -> None:
        if not self.enabled:
            return
        self._bar = _RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.total, completed=completed, info="")

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
