"""The local executor: submitit's LocalExecutor, ``parallel`` processes at a time (one per run, or per cohort),
teachers before students.

A stop signal to the sweep (SIGTERM, Ctrl-C) stops its workers cleanly: each running job's controller gets
SIGTERM, forwards it to the worker, whose RunJob saves a mid-epoch checkpoint and exits; what does not stop within
the stop wait is killed (and resumes from its last checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import submitit

from hkdbench.benchmark.sweep.dispatch import SubmitOptions, Sweep, SweepResult
from hkdbench.benchmark.sweep.plan import Cohort
from hkdbench.benchmark.sweep.status import RunState


def submit(sweep: Sweep, teachers: List[Cohort], students: List[Cohort], skip: List[RunState],
           options: SubmitOptions) -> SweepResult:
    parallel = options.parallel
    parallel = parallel or max(1, (os.cpu_count() or 1) // sweep.preset.slurm.cpus_per_task)
    os.environ.setdefault("OMP_NUM_THREADS", str(sweep.preset.slurm.cpus_per_task))
    executor = submitit.AutoExecutor(folder=str(sweep.folder / "%j"), cluster="local")
    executor.update_parameters(timeout_min=sweep.preset.slurm.time, tasks_per_node=1)
    submitted: List[Tuple[str, str]] = []
    failed = 0
    sweep.say(f"local executor: at most {parallel} job(s) at a time; submitit logs in {sweep.folder}")
    with StopSignals() as stop:
        for phase, cohorts in (("teacher", teachers), ("student", students)):
            failed += _run_phase(sweep, executor, phase, cohorts, parallel, submitted, stop)
            if stop.signum:
                break
    return SweepResult(sweep.sweep_dir, submitted, skip, sweep.folder, failed, stop.signum)


def _run_phase(sweep, executor, phase: str, cohorts, parallel: int, submitted, stop: "StopSignals") -> int:
    """Runs one phase's jobs (a run or a cohort each), ``parallel`` at a time; on a stop signal stops the
    running ones (returns at once). Returns how many runs failed."""
    failed = 0
    queue, running = list(cohorts), []
    while queue or running:
        if stop.signum:
            _stop_jobs(sweep, running, stop.signum)
            return failed
        while queue and len(running) < parallel and not stop.signum:
            cohort = sweep.untaken(queue.pop(0))  # runs done or owned meanwhile take no worker slot
            if cohort is None:
                continue
            with stop.ignoring_sigint():  # the job's processes inherit it: Ctrl-C reaches them only via us
                job = executor.submit(sweep.job(cohort))
            sweep.record(cohort, "local", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
            submitted += [(name, str(job.job_id)) for name in cohort.names]
            what = (f"cohort {cohort.id} ({', '.join(cohort.names)})" if cohort.grouped
                    else f"run {cohort.names[0]}")
            sweep.say(f"submitted {phase} {what} as local job {job.job_id}")
            running.append((cohort, job))
        time.sleep(0.5)
        for cohort, job in list(running):
            if job.done():
                running.remove((cohort, job))
                failed += sweep.report_members(cohort, str(job.job_id), str(job.paths.stderr))
    return failed


def _stop_jobs(sweep, running, signum: int) -> None:
    """Stops the running local jobs cleanly: SIGTERM to each job's controller, which forwards it to the
    worker (its RunJob saves a checkpoint and exits), repeated until they are gone (a worker still starting
    may miss the first); past the trainer's stop wait, kills what is left."""
    name = signal.Signals(signum).name
    sweep.say(f"{name}: stopping {len(running)} running job(s); each saves a checkpoint and exits, and "
              "re-running this sweep resumes them")
    deadline = time.monotonic() + sweep.preset.slurm.stop_wait + 30
    alive = list(running)
    while alive and time.monotonic() < deadline:
        for _, job in alive:
            _signal_pid(int(job.job_id), signal.SIGTERM)
        time.sleep(1.0)
        alive = [(cohort, job) for cohort, job in alive if not job.done()]
    for cohort, job in running:
        if (cohort, job) in alive:
            _kill_tree(int(job.job_id))
        for spec in cohort.specs:
            if (cohort, job) in alive:
                sweep.say(f"killed: {spec.name} (job {job.job_id} did not stop in time; it resumes from its "
                          "last checkpoint)")
            else:
                status = sweep.store.run_dir(spec.cfg).status()
                sweep.say(f"stopped: {spec.name} (job {job.job_id}, {status})")


class StopSignals:
    """While a local sweep runs: SIGTERM and SIGINT are recorded (``signum``) instead of killing the sweep
    process, which would leave its job processes training on, orphaned."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: Dict[int, Any] = {}

    def _record(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach the main thread only; a sweep run from a thread keeps the defaults
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @contextlib.contextmanager
    def ignoring_sigint(self) -> Iterator[None]:
        """Processes started inside inherit an ignored SIGINT: a terminal's Ctrl-C (sent to the whole process
        group) would otherwise make submitit's controller kill its worker a second later, before it saves."""
        if not self._previous:
            yield
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, self._record)


def _signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _kill_tree(pid: int) -> None:
    """SIGKILL to a process and its children (Linux /proc; the process alone elsewhere)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        for child in children.read_text().split():
            _kill_tree(int(child))
    _signal_pid(pid, signal.SIGKILL)
