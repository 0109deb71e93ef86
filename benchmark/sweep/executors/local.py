"""The local executor: submitit's LocalExecutor, ``parallel`` processes at a time (one per run, or per cohort),
teachers before students. Its processes are sized by the preset's ``slurm:`` section (``cpus_per_task`` threads
each, ``time`` minutes at most, ``stop_wait_s`` to save on a stop): one set of job resources for both executors.

A stop signal to the sweep (SIGTERM, Ctrl-C) stops its workers cleanly: each running job's controller gets
SIGTERM, forwards it to the worker, whose RunJob saves a mid-epoch checkpoint and exits; what does not stop within
the stop wait is killed (and resumes from its last checkpoint).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import submitit

from hkdbench.benchmark.engine.stopping import StopSignals
from hkdbench.benchmark.sweep.executors.base import JobRecord, SubmititExecutor, SubmitOptions, SweepResult


class LocalExecutor(SubmititExecutor):
    name = "local"
    description = "local processes (submitit), --parallel at a time"
    options_section = "slurm"

    def submit(self, teachers, students, skip, options: SubmitOptions) -> SweepResult:
        sweep, opts = self.sweep, self.options
        parallel = options.parallel or max(1, (os.cpu_count() or 1) // opts.cpus_per_task)
        os.environ.setdefault("OMP_NUM_THREADS", str(opts.cpus_per_task))
        executor = submitit.AutoExecutor(folder=str(sweep.folder / "%j"), cluster="local")
        executor.update_parameters(timeout_min=opts.time, tasks_per_node=1)
        submitted: List[Tuple[str, str]] = []
        failed = 0
        sweep.say(f"local executor: at most {parallel} job(s) at a time; submitit logs in {sweep.folder}")
        # the sweep's process records a stop signal instead of dying, which would leave its jobs training on,
        # orphaned; a second Ctrl-C does not abort it either, for the same reason
        with StopSignals(second_interrupt_aborts=False) as stop:
            for phase, cohorts in (("teacher", teachers), ("student", students)):
                failed += self._run_phase(executor, phase, cohorts, parallel, submitted, stop)
                if stop.signum:
                    break
        return SweepResult(sweep.sweep_dir, submitted, skip, sweep.folder, failed, stop.signum)

    def _run_phase(self, executor, phase: str, cohorts, parallel: int, submitted, stop: StopSignals) -> int:
        """Runs one phase's jobs (a run or a cohort each), ``parallel`` at a time; on a stop signal stops the
        running ones (returns at once). Returns how many runs failed."""
        sweep = self.sweep
        failed = 0
        queue, running = list(cohorts), []
        while queue or running:
            if stop.signum:
                self._stop_jobs(running, stop.signum)
                return failed
            while queue and len(running) < parallel and not stop.signum:
                cohort = sweep.untaken(queue.pop(0))  # runs done or owned meanwhile take no worker slot
                if cohort is None:
                    continue
                with stop.ignoring_sigint():
                    job = executor.submit(sweep.job(cohort))
                sweep.record(cohort, self.name, str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
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

    def _stop_jobs(self, running, signum: int) -> None:
        """Stops the running local jobs cleanly: SIGTERM to each job's controller, which forwards it to the
        worker (its RunJob saves a checkpoint and exits), repeated until they are gone (a worker still starting
        may miss the first); past the trainer's stop wait, kills what is left."""
        sweep = self.sweep
        name = signal.Signals(signum).name
        sweep.say(f"{name}: stopping {len(running)} running job(s); each saves a checkpoint and exits, and "
                  "re-running this sweep resumes them")
        deadline = time.monotonic() + self.options.stop_wait + 30
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

    @classmethod
    def states(cls, jobs: Sequence[JobRecord]) -> Dict[str, Tuple[str, str]]:
        """From each job's submitit result file, else its process (the job id is the controller's pid)."""
        return {str(job.get("job_id")): cls._state(job) for job in jobs}

    @classmethod
    def _state(cls, job: JobRecord) -> Tuple[str, str]:
        if cls.outcome(job) is not None:
            err = cls.error(job)
            return ("FAILED", err) if err else ("COMPLETED", "")
        return ("RUNNING", "") if _pid_alive(job.get("job_id")) else ("CANCELLED", "the process is gone")

    @classmethod
    def cancel(cls, jobs: Sequence[JobRecord]) -> List[str]:
        """SIGTERM to each live job's controller: its worker saves a checkpoint and exits, as on a stopped sweep."""
        reached = [str(job.get("job_id")) for job in jobs if _pid_alive(job.get("job_id"))]
        for job_id in reached:
            _signal_pid(int(job_id), signal.SIGTERM)
        return reached


def _pid_alive(job_id) -> bool:
    try:
        os.kill(int(job_id), 0)
    except (OSError, ValueError, TypeError):  # gone, or a record without a pid
        return False
    return True


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
