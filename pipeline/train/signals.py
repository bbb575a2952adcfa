"""Stopping on a signal: SIGUSR1 (Slurm's warning before the time limit), SIGTERM and SIGINT.

The handler records the signal; the loop looks at it between steps (all ranks agree, so they stop
at the same step and checkpoint together). Where a rank can wait for long outside a step (for the
next batch) the wait is `interruptible()`: the signal ends it at once. A second signal while a
stop is pending ends the process wherever it is. Exit codes: 75 (requeue me) after SIGUSR1/SIGTERM,
130 after SIGINT. Loader workers ignore these signals (pipeline.data.loader): the main process
shuts them down.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

from pipeline.launch.env import REQUEUE_EXIT_CODE

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A stop signal that ends what the process is doing: a wait, or anything after a second signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(signum: int) -> int:
    return 130 if signum == signal.SIGINT else REQUEUE_EXIT_CODE


class StopSignals:
    def __init__(self):
        self.received: int = 0
        self._waiting = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        again = bool(self.received)
        self.received = signum
        if self._waiting or again:
            raise Interrupted(signum)

    @contextmanager
    def interruptible(self):
        """A wait that a stop signal ends at once (raising Interrupted)."""
        if self.received:
            raise Interrupted(self.received)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
