"""The runs of a cohort against the store, from the checks before any write to their last file: each run's flock
(taken in name order, so two cohorts never wait on each other), claimed and cleaned, reset on ``--restart``, its
checkpoint read on ``--resume``; a run already done is left as it is (also in a read-only store). A run ends
FAILED (with its reason; no summary), stopped (its checkpoint kept for a resume) or done (its metrics, final
weights, summary and DONE marker). Every line said goes to the log of the runs it concerns."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

from hkdbench.methods import check_method_code

from hkdbench.benchmark.core.config import RunConfig
from hkdbench.benchmark.core.errors import HkdbenchError
from hkdbench.benchmark.core.store import RunDir, RunLockedError, RunStore, StoreWriteError
from hkdbench.benchmark.engine.member import Member, RunResult
from hkdbench.benchmark.engine.preflight import check_on_device
from hkdbench.benchmark.engine.ranks import RankLayout, check_layout
from hkdbench.benchmark.engine.records import keep_last, read_checkpoint
from hkdbench.benchmark.engine.teacher import check_probe_teachers
from hkdbench.benchmark.engine.tracking import check_tracker_available

log = logging.getLogger("hkdbench")


class DivergedError(HkdbenchError, RuntimeError):
    """The loss became NaN or infinite; the run is marked FAILED."""


class RunExistsError(HkdbenchError, RuntimeError):
    pass


def unfinished_run_error(rd: RunDir) -> RunExistsError:
    """The error of a run with a checkpoint opened without --resume or --restart."""
    return RunExistsError(f"{rd.path} has a checkpoint from an earlier, unfinished run; pass --resume to continue "
                          "it or --restart to start over")


class RunLifecycle:
    """The runs of one cohort in the store, on ``device``; under DDP (``dist``) rank 0 alone writes."""

    def __init__(self, cfgs: Sequence[RunConfig], store: RunStore, device, dist=None, echo: bool = True):
        self.cfgs, self.store, self.device, self.dist, self.echo = list(cfgs), store, device, dist, echo
        self.run_dirs = [store.run_dir(cfg) for cfg in self.cfgs]
        self.log_dirs: List[RunDir] = []  # the logs of the runs being trained (a done run's log is left alone)
        self.early_lines: List[str] = []  # said while the teacher was prepared, before the runs' logs existed

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0

    @property
    def world_size(self) -> int:
        """The processes (devices) training the cohort; ``train.world`` is the ranks they train."""
        return self.dist.world_size if self.dist else 1

    def layout(self, cfg: RunConfig) -> RankLayout:
        """Which of ``cfg``'s ranks this process trains."""
        return RankLayout(cfg.train.world, self.dist.rank if self.dist else 0, self.world_size)

    def say(self, message: str, members: Optional[Sequence[Member]] = None) -> None:
        """Logs, prints (``echo``) and appends the line to the log of each member (default: every run in training)."""
        if not self.is_main:
            return
        log.info(message)
        if self.echo:
            print(message, flush=True)
        if members is None and not self.log_dirs:  # before any run directory exists: kept for their logs
            self.early_lines.append(message)
        for rd in [m.run_dir for m in members] if members is not None else self.log_dirs:
            with open(rd.log_file, "a") as f:
                f.write(message + "\n")

    def check_before_writes(self, resume: bool, restart: bool) -> None:
        """Changed method code, a missing tracker package or probe teacher, a setting the device cannot run, ranks
        the processes cannot train as the reference did, a checkpoint without --resume (said here, not after a
        teacher was trained for it)."""
        for cfg, rd in zip(self.cfgs, self.run_dirs):
            check_method_code(cfg.method, cfg.method_code)
            check_tracker_available(cfg.train.log)
            check_on_device(cfg, self.device)
            check_layout(cfg, self.world_size, self.device)
            if not resume and not restart and not rd.is_done and rd.has_checkpoint:
                raise unfinished_run_error(rd)
        check_probe_teachers(self.cfgs, self.store)

    def under_locks(self, train: Callable[[List[RunConfig]], List[RunResult]], restart: bool,
                    wait_for_lock: bool) -> List[RunResult]:
        """``train`` on the runs whose flocks this process holds, one RunResult per run in order. With
        ``wait_for_lock=False`` a run whose lock another process holds is left to it ('owned'), and a cohort of
        one raises RunLockedError."""
        results: Dict[str, RunResult] = {}
        with contextlib.ExitStack() as locks:
            held = []
            for cfg, rd in sorted(zip(self.cfgs, self.run_dirs), key=lambda pair: pair[1].path.name):
                try:
                    if self.is_main:  # under DDP only rank 0 holds the flocks (other ranks would wait forever)
                        locks.enter_context(rd.lock(wait=wait_for_lock))
                    held.append(cfg)
                except RunLockedError:
                    if len(self.cfgs) == 1:
                        raise
                    results[rd.path.name] = RunResult("owned", rd)
                except StoreWriteError:
                    if not rd.is_done or restart:
                        raise
                    results[rd.path.name] = self._done_read_only(rd)
            if held:
                for result in train([c for c in self.cfgs if c in held]):
                    results[result.run_dir.path.name] = result
        return [results[rd.path.name] for rd in self.run_dirs]

    def _done_read_only(self, rd: RunDir) -> RunResult:
        if self.echo:  # a read-only store: a finished run needs no write
            print(f"{rd.path.name}: already done (read-only store: nothing written)", flush=True)
        return RunResult("done", rd, rd.summary())

    def open(self, cfg: RunConfig, resume: bool, restart: bool) -> Member:
        """The member of one locked run: claimed, cleaned of stray temp files, reset on restart; done, or with its
        checkpoint read (a damaged one, or one without --resume, fails here, before any training)."""
        rd = self.store.run_dir(cfg)
        member = Member(cfg, rd)
        try:
            if self.is_main:
                rd.claim(cfg)
                if removed := rd.remove_stray_temp_files():  # left by a kill mid-write; we hold the lock
                    self.say(f"{rd.path.name}: removed temp files left by an interrupted write: "
                             f"{', '.join(removed)}", [member])
            if restart and self.is_main:
                rd.reset()
        except StoreWriteError:
            if not rd.is_done or restart:
                raise
            member.status, member.result = "done", self._done_read_only(rd)
            return member
        if rd.is_done:
            self.say(f"{rd.path.name}: already done", [member])
            member.end("done", summary=rd.summary())
            return member
        if rd.has_checkpoint and not resume:
            raise unfinished_run_error(rd)
        member.saved = read_checkpoint(rd, cfg, self.device) if rd.has_checkpoint else None
        return member

    def start_logs(self, members: Sequence[Member]) -> None:
        """The runs about to train take every line said from now on, after those said while their teacher was
        prepared, in the order said."""
        self.log_dirs = [m.run_dir for m in members]
        if self.is_main:
            for m in members:
                with open(m.run_dir.log_file, "a") as f:
                    f.writelines(line + "\n" for line in self.early_lines)

    def fail(self, m: Member, reason: str, **details: Any) -> None:
        """Marks the member FAILED with ``reason``: no summary, no DONE; the other members go on."""
        if self.is_main:
            m.run_dir.mark_failed(reason, **details)
        self.say(f"{m.name}: FAILED: {reason}", [m])
        m.end("failed", reason=reason)
        m.tracker.close()

    def stopped(self, m: Member, epoch: int, step: int, saved: bool) -> None:
        """A stop request ended the member's training (``saved``: its checkpoint at (epoch, step) was just written;
        else it keeps the one it has)."""
        if saved:
            self.say(f"{m.name}: stop requested; checkpoint saved at epoch {epoch + 1}, step {step}", [m])
        m.tracker.close()
        m.end("interrupted")

    def finish(self, m: Member, summary: Dict[str, Any]) -> None:
        """The run's last files: its metrics (never short of the final epoch), final weights, summary and DONE;
        then its resume checkpoint goes unless train.keep_checkpoint (a kill in between leaves a DONE run)."""
        rd = m.run_dir
        if self.is_main:
            rd.write_metrics(m.state["history"])
            keep_last(m)
            rd.mark_done(summary)
            if not m.cfg.train.keep_checkpoint:
                rd.remove_checkpoint()
        m.tracker.log_summary(summary)
        m.tracker.close()
        selected = (f"top-1 {summary['selected_top1']:.2f} at the validation-selected epoch "
                    f"{summary['selected_epoch']}, best on test " if "selected_top1" in summary else "best top-1 ")
        self.say(f"{rd.path.name}: done; {selected}{summary['best_top1']:.2f} (epoch {summary['best_epoch']}), "
                 f"last {summary['last_top1']:.2f}", [m])
        m.end("done", summary=summary)
