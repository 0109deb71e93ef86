"""Clean stops for ``hkdbench train``/``teacher``: SIGTERM or a first Ctrl-C asks the trainer to finish its step and
save a mid-epoch checkpoint (as Slurm's USR2 does); a second Ctrl-C aborts at once."""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Iterator, Optional


class StopSignals:
    """Records the first stop signal; ``requested`` is the trainer's ``should_stop``."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step
        self.signum = signum
        print(f"hkdbench: {signal.Signals(signum).name} received; finishing the step and saving a checkpoint "
              "(Ctrl-C again aborts without saving)", file=sys.stderr, flush=True)

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)  # the shell's convention: 143 for TERM, 130 for INT


@contextlib.contextmanager
def stop_signals() -> Iterator[StopSignals]:
    stops = StopSignals()
    previous = {sig: signal.signal(sig, stops._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stops
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
