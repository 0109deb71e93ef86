"""Live progress of a training epoch: a tqdm bar on a terminal, and elsewhere (a Slurm log, a redirected
stdout) one line every ``train.log_interval`` steps with the loss, the lr, images/s and the time left, as timm's
``train.py`` logs every ``--log-interval`` batches. The epoch's own line (and metrics.jsonl) stay the record."""
from __future__ import annotations

import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1:02:05'``; ``65`` -> ``'1:05'``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class EpochProgress:
    """One epoch's progress. ``update`` after every step; ``close`` at the end (or at a stop).

    ``bar``: draw tqdm (a terminal). Otherwise ``say`` gets a line every ``interval`` steps (0: never) and at
    the epoch's last step. The rate counts only the steps of this epoch run by this process, so a resumed
    epoch's ETA is not skewed by the steps done before the stop.
    """

    def __init__(self, *, epoch: int, epochs: int, steps: int, start_step: int, interval: int, bar: bool,
                 say: Callable[[str], None], clock: Callable[[], float] = time.perf_counter):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.interval, self.say, self.clock = interval, say, clock
        self.step_done = start_step
        self.first_step = start_step
        self.images = 0
        self.started = clock()
        self.bar = _tqdm(steps, start_step, f"epoch {epoch + 1}") if bar else None

    def update(self, loss: float, lr: float, images: int) -> None:
        self.step_done += 1
        self.images += images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.interval and (self.step_done % self.interval == 0 or self.step_done == self.steps):
            self.say(self.line(loss, lr))

    def line(self, loss: float, lr: float) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        steps_per_s = (self.step_done - self.first_step) / elapsed
        left_epoch = (self.steps - self.step_done) / max(steps_per_s, 1e-9)
        left_run = left_epoch + (self.epochs - self.epoch - 1) * self.steps / max(steps_per_s, 1e-9)
        width = len(str(self.steps))
        return (f"epoch {self.epoch + 1}/{self.epochs} step {self.step_done:>{width}}/{self.steps} "
                f"loss {loss:.4f} lr {lr:.2e} {self.images / elapsed:.0f} img/s "
                f"eta epoch {format_duration(left_epoch)} run {format_duration(left_run)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm(total: int, initial: int, desc: str) -> Optional[object]:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
