"""Ctrl-C between a step's update and its bookkeeping: held back until the step is whole.

An optimizer update changes the weights; the step counter, the data position and the step's callbacks (its
metrics.jsonl row, eval, checkpoint) say which step those weights belong to. A KeyboardInterrupt landing between
the two would let the interrupt checkpoint label step-N weights that already hold update N+1 (resume then replays
N+1 on top of them), or drop step N's metrics row. So from just before the update until the step's callbacks have
run, a first Ctrl-C only says so; the loop raises it once the step is complete, and the normal interrupt save
follows at a consistent step. A second Ctrl-C stops at once, except between the update and the step count (a few
milliseconds), where it too waits for the count.

A distributed run cannot stop where one process happens to receive the signal: torchrun passes a Ctrl-C on to its
processes one after the other, so one may be in step N+1's forward while another finishes step N, and a checkpoint
(FSDP gathers it collectively) or an eval would then mix steps or wait for dist_timeout_s. There a first Ctrl-C only
sets `requested`; the next step's first all-reduce (the supervised counts it sums anyway, train/distributed.py)
carries the flag, and when any process set it every process stops at that same step boundary (`StopAgreed`, a
KeyboardInterrupt) and the interrupt save follows on all of them. A second Ctrl-C stops that process at once.

The handler is installed once per fit (`installed`); a step only flips flags (`hold`, `settle`, `release`), so the
hot path costs three attribute writes. Outside a held step the handler passes the signal to the one it replaced
(Python's default raises KeyboardInterrupt at once, as before). Checkpoint writes defer Ctrl-C on their own
(`checkpoint.sigint_deferred`, installed over this one while a file is written).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StepInterrupts:
    """Ctrl-C held back over the end of a step (see the module docstring)."""

    def __init__(self, distributed: bool = False) -> None:
        self.distributed = distributed  # a first Ctrl-C only requests a stop the processes agree on
        self._old = None  # the handler replaced while installed (None: not installed)
        self._step: int | None = None  # the step being finished (None: Ctrl-C acts at once)
        self._settled = False  # the step count has advanced: a second Ctrl-C may stop now
        self.pressed = 0
        self.requested = False  # distributed: Ctrl-C pressed, the stop not yet agreed on

    @contextmanager
    def installed(self) -> Iterator[StepInterrupts]:
        """Our SIGINT handler for the duration (main thread only, and only over a Python-level handler: with SIGINT
        ignored or at the OS default nothing is installed and nothing is held). Leaves nothing held behind."""
        old = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(old):
            yield self
            return
        self._old = old
        signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)
            self._old, self._step, self._settled, self.pressed = None, None, False, 0
            self.requested = False

    def hold(self, step: int) -> None:
        """Step `step`'s update is about to be applied: from here Ctrl-C waits for `release`."""
        self._step, self._settled, self.pressed = step, False, 0

    def settle(self) -> None:
        """The step count has advanced: a second Ctrl-C (or two already pressed) stops now."""
        self._settled = True
        if self.pressed > (0 if self.distributed else 1):  # distributed: a press here is already the second
            self._step = None
            raise KeyboardInterrupt

    def release(self) -> None:
        """The step is complete (callbacks run): a Ctrl-C pressed meanwhile is raised here."""
        self._step = None
        if self.pressed:
            self.pressed = 0
            raise KeyboardInterrupt

    def request(self) -> None:
        """Distributed: stop at the next step boundary the processes agree on (a Ctrl-C while a checkpoint was
        written, `checkpoint.sigint_deferred`, comes back through here)."""
        if not self.requested:
            self.requested = True
            os.write(
                2,
                b"\nstopping: every process finishes its step, then they save the same step and stop; press Ctrl-C "
                b"again to stop this process at once\n",
            )

    def _handler(self, signum, frame) -> None:
        if self.distributed and not self.requested:
            return self.request()
        if self._step is None:
            return self._old(signum, frame)  # not in a held step: as if we were not here
        self.pressed += 1
        if self.pressed == 1 and not self.distributed:
            # os.write, not print: a handler may run in the middle of another print to the same stream
            os.write(
                2,
                f"\nfinishing step {self._step} (update, metrics, eval), then saving and stopping; press Ctrl-C "
                "again to skip its metrics and eval\n".encode(),
            )
        elif self._settled:
            self._step = None
            raise KeyboardInterrupt
