"""SIGTERM and SIGUSR1 (SLURM's warning before a kill or preemption) as a flag the loop checks."""

from __future__ import annotations

import signal

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class StopFlag:
    """Within the block, a stop signal only sets `received`; training checkpoints and exits."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        try:
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the main process, which checkpoints and exits."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
