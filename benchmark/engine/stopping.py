"""The one stop-signal handler, used by ``hkdbench train``/``teacher``, by a sweep's job (``sweep/job.py``) and by a
local sweep (``sweep/executors/local.py``).

SIGTERM or a first Ctrl-C asks for a clean stop (the trainer finishes its step and saves a mid-epoch checkpoint,
as on Slurm's USR2); later signals are ignored, except a second Ctrl-C, which aborts at once where the caller
allows it. The first signal decides the exit code (128 + its number, the shell's convention).
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Optional, Sequence

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def announce_checkpoint(signum: int) -> None:
    """What ``hkdbench train`` says on the first stop signal."""
    print(f"hkdbench: {signal.Signals(signum).name} received; finishing the step and saving a checkpoint "
          "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)


class StopSignals:
    """While entered, records the first of ``signals`` (``signum``; ``requested`` is the trainer's ``should_stop``)
    and calls ``on_stop`` with it; a second Ctrl-C raises KeyboardInterrupt when ``second_interrupt_aborts``.
    The previous handlers come back on exit. Python installs handlers in the main thread only: entered from
    another thread, it changes nothing."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, on_stop: Optional[Callable[[int], None]] = None,
                 second_interrupt_aborts: bool = True) -> None:
        self.signals = tuple(signals)
        self.on_stop = on_stop
        self.second_interrupt_aborts = second_interrupt_aborts
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def requested(self) -> bool:
        return bool(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 143 for TERM, 130 for INT

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:
            if signum == signal.SIGINT and self.second_interrupt_aborts:
                raise KeyboardInterrupt  # the user does not want to wait for the step
            return
        self.signum = signum
        if self.on_stop is not None:
            self.on_stop(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def ignoring_sigint(self) -> Iterator[None]:
        """Processes started inside inherit an ignored SIGINT: a terminal's Ctrl-C (sent to the whole process
        group) would otherwise reach them directly (submitit's controller would kill its worker a second later,
        before it saves) instead of through this handler."""
        if signal.SIGINT not in self._previous:
            yield
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._handle)


def stop_signals() -> StopSignals:
    """``hkdbench train``'s handler: ``with stop_signals() as stops: train(..., should_stop=stops.requested)``."""
    return StopSignals(on_stop=announce_checkpoint)
