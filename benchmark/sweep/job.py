"""The job that trains one run of a sweep, or one cohort of runs (``sweep --cohort``), on any executor.

A :class:`RunJob` is a ``submitit.helpers.Checkpointable`` over one run config or several (a cohort: the
engine's ``train_cohort`` trains them in one process on one data stream and one teacher pass). Its ``__call__``
trains in a worker thread while the main thread waits, because submitit calls ``checkpoint()`` from its USR2
handler in the main thread while ``__call__`` is still running, then requeues the job and exits at once.
``checkpoint()`` sets the stop flag, waits (at most ``stop_wait_s``) for the trainer to finish its current step and
save a mid-epoch checkpoint, and returns a fresh ``RunJob`` over the same configs for the requeued job, which
resumes every member from its run dir (the engine skips members already done). The job returns every member's
status and raises when one of them failed (diverged, or an error), so a Slurm ``afterok`` and the local executor
see the failure; a member whose lock another live process holds is left to that process (``owned``). The job
carries the submitter's method plugins and imports them in the worker. Results are never taken from
``job.result()``: the run store says.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import submitit

from hkdbench.benchmark.core.config import run_config_from_dict
from hkdbench.benchmark.core.store import RunLockedError, RunStore
from hkdbench.benchmark.engine.stopping import STOP_SIGNALS, StopSignals
from hkdbench.benchmark.sweep.plan import cohort_id


OWNED = "owned"  # a job's outcome when another live process holds its run's lock


class RunJob(submitit.helpers.Checkpointable):
    """Trains one run, or a cohort of runs (resuming each one that has a checkpoint). Picklable: only plain data
    until it runs."""

    def __init__(self, cfg: Union[Dict[str, Any], List[Dict[str, Any]]], runs_dir: str, device: Optional[str] = None,
                 threads: int = 1, stop_wait_s: float = 60.0, plugins: Optional[str] = None,
                 outputs_for: Sequence[Dict[str, Any]] = ()):
        self.cfgs: List[Dict[str, Any]] = list(cfg) if isinstance(cfg, (list, tuple)) else [cfg]
        # a teacher run's job: the student runs that read its stored outputs (train.teacher_outputs=stored), whose
        # outputs it computes once the teacher is trained, before the student jobs (which wait for this one) start
        self.outputs_for: List[Dict[str, Any]] = list(outputs_for)
        if not self.cfgs:
            raise ValueError("a RunJob needs at least one run config")
        self.runs_dir = str(runs_dir)
        self.device = device
        self.threads = threads
        self.stop_wait_s = stop_wait_s
        # the submitting process's method plugins (HKDBENCH_METHODS), .py paths made absolute: the worker (a
        # local process, a Slurm node) imports them before it looks its method up
        self.plugins = _absolute_plugins(os.environ.get("HKDBENCH_METHODS", "") if plugins is None else plugins)

    def __getstate__(self) -> Dict[str, Any]:  # threads and events never travel
        return {k: self.__dict__[k] for k in ("cfgs", "runs_dir", "device", "threads", "stop_wait_s", "plugins",
                                              "outputs_for")}

    def _load_plugins(self) -> None:
        """Imports the submitter's plugins unless this process has them (an inline sweep's, or a requeue's)."""
        from hkdbench.methods import list_methods, load_plugins

        if self.plugins and any(c["method"] not in list_methods() for c in self.cfgs):
            os.environ["HKDBENCH_METHODS"] = self.plugins
            load_plugins(self.plugins)

    @property
    def names(self) -> List[str]:
        return [run_config_from_dict(c).run_name() for c in self.cfgs]

    @property
    def name(self) -> str:
        """The run's name; a cohort's id and size."""
        names = self.names
        return names[0] if len(names) == 1 else f"cohort {cohort_id(names)} ({len(names)} runs)"

    def __call__(self) -> Dict[str, Any]:
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        torch.set_num_threads(max(int(self.threads), 1))
        self._load_plugins()
        self._stop = threading.Event()
        with self._stop_signals():
            return self._run()

    def _run(self) -> Dict[str, Any]:
        """Trains in a worker thread; the main thread stays free for submitit's signal handlers."""
        from hkdbench.benchmark.engine import distributed

        self._outcome: Dict[str, Any] = {}
        dist_ctx = distributed.init_from_submitit()
        should_stop = self._stop.is_set if dist_ctx is None else dist_ctx.stop_fn(self._stop.is_set)
        device = self.device
        if dist_ctx is not None and dist_ctx.backend == "nccl":
            device = str(dist_ctx.device())
        self._thread = threading.Thread(target=self._train, args=(device, should_stop, dist_ctx), daemon=True,
                                        name="hkdbench-train")
        self._thread.start()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:  # Ctrl-C (inline sweeps), or a second one: stop after the current step and save
            self._stop.set()
            self._thread.join(self.stop_wait_s)
            raise
        if "error" in self._outcome:
            raise self._outcome["error"]
        outcome = {k: v for k, v in self._outcome.items() if k != "error"}
        if outcome.get("status") == "interrupted" and dist_ctx is not None and dist_ctx.rank != 0:
            # rank 0 is checkpointing and requeueing the whole job: wait to be stopped rather than exit early
            time.sleep(self.stop_wait_s + 60)
        if dist_ctx is not None and outcome.get("status") == "done":
            distributed.shutdown()
        return outcome

    def _stop_signals(self) -> StopSignals:
        """submitit ignores SIGTERM. A local sweep stops its workers with it (Ctrl-C stops them too); Slurm sends it
        on scancel, on preemption and at the time limit (after the USR2 of --signal, if that came in time): each
        stops after the current step with a mid-epoch checkpoint, which the requeued job or the next submission of
        the sweep resumes. An inline job keeps the sweep process's handlers (Ctrl-C: KeyboardInterrupt)."""
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        signals = {"local": STOP_SIGNALS, "slurm": (signal.SIGTERM,)}.get(executor or "", ())
        return StopSignals(signals, on_stop=self._on_stop_signal)

    def _on_stop_signal(self, signum: int) -> None:
        self._stop.set()
        print(f"hkdbench: {signal.Signals(signum).name}: stopping {self.name} after the current step (a checkpoint "
              "is saved; re-running the sweep resumes it)", file=sys.stderr, flush=True)

    def _train(self, device, should_stop, dist_ctx) -> None:
        from hkdbench.benchmark.engine.trainer import TeacherUnavailableError, train_cohort

        cfgs = [run_config_from_dict(c) for c in self.cfgs]
        store = RunStore(self.runs_dir)
        try:
            results = train_cohort(cfgs, runs_dir=self.runs_dir, resume=True, device=device, progress=False,
                                   wait_for_lock=False, should_stop=should_stop, dist_ctx=dist_ctx)
            statuses = {cfg.run_name(): r.status for cfg, r in zip(cfgs, results)}
            if set(statuses.values()) == {"done"}:
                self._compute_teacher_outputs(device)
        except RunLockedError:  # a cohort of one whose lock another process holds (a larger one says 'owned')
            statuses = {cfg.run_name(): OWNED for cfg in cfgs}
        except TeacherUnavailableError:  # a stop request arrived while the job was training the shared teacher
            statuses = {cfg.run_name(): "interrupted" for cfg in cfgs}
        except BaseException as err:  # noqa: BLE001 -- recorded in the run dirs, re-raised by __call__
            self._fail(store, cfgs)
            self._outcome["error"] = err
            return
        for name, status in statuses.items():
            if status == OWNED:  # a racing sweep's job trains this run: leave it to that one
                print(f"hkdbench: {name} is owned by another process (its lock is held); this job exits "
                      "without training it", file=sys.stderr, flush=True)
        self._outcome.update(self._summarise(statuses))
        failed = [name for name, status in statuses.items() if status == "failed"]
        if failed:  # the trainer wrote each reason to the run's FAILED file
            self._outcome["error"] = _diverged_error(store, cfgs, statuses)

    def _compute_teacher_outputs(self, device) -> None:
        """The stored outputs of the finished teacher run for its student runs that read them: one set per data
        stream the students share (``engine/teacher_outputs.py``)."""
        from hkdbench.benchmark.engine.cohort import group_cohorts
        from hkdbench.benchmark.engine.trainer import compute_teacher_outputs

        for group in group_cohorts([run_config_from_dict(c) for c in self.outputs_for]):
            outputs = compute_teacher_outputs(group, self.runs_dir, device)
            print(f"hkdbench: teacher outputs {outputs.folder.path.name}: {len(outputs.manifest()['shards'])} "
                  "epochs stored", flush=True)

    def _summarise(self, statuses: Dict[str, str]) -> Dict[str, Any]:
        """The job's return value: a run's status as a single run's job returns it; for a cohort, also its id and
        every member's status."""
        values = set(statuses.values())
        overall = ("interrupted" if "interrupted" in values else "failed" if "failed" in values
                   else OWNED if values == {OWNED} else "done")
        if len(statuses) == 1:
            ((name, status),) = statuses.items()
            return {"status": status, "run": name}
        return {"status": overall, "cohort": cohort_id(list(statuses)), "runs": dict(statuses)}

    def _fail(self, store: RunStore, cfgs) -> None:
        """Marks FAILED, with the error, every member the error left unfinished (not one another live process
        owns, nor one the trainer already marked)."""
        if dist_rank() != 0:
            return
        err = sys.exc_info()[1]
        details: Dict[str, Any] = {"traceback": traceback.format_exc(limit=20)}
        try:
            paths = submitit.JobEnvironment().paths
            details.update(job_id=submitit.JobEnvironment().job_id, log=str(paths.stderr))
        except RuntimeError:
            pass
        for cfg in cfgs:
            rd = store.run_dir(cfg)
            if rd.is_done or rd.failed_file.exists() or rd.is_locked():
                continue
            rd.path.mkdir(parents=True, exist_ok=True)
            rd.mark_failed(f"{type(err).__name__}: {err}", **details)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time-out or preemption), in the main thread while ``__call__`` runs:
        asks the trainer to stop after its current step, waits for the checkpoints to be saved, and hands a
        fresh job over the same runs to the requeue (which resumes them from their run dirs)."""
        stop = getattr(self, "_stop", None)
        thread = getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join(self.stop_wait_s)
            if thread.is_alive():
                print(f"hkdbench: the trainer did not stop within {self.stop_wait_s:.0f} s; the requeued job "
                      "resumes from the last saved checkpoint", file=sys.stderr, flush=True)
            else:
                print(f"hkdbench: trainer stopped ({self._outcome.get('status')}); requeueing", file=sys.stderr,
                      flush=True)
        return submitit.helpers.DelayedSubmission(
            RunJob(self.cfgs, self.runs_dir, self.device, self.threads, self.stop_wait_s, self.plugins,
                   self.outputs_for))


def _diverged_error(store: RunStore, cfgs, statuses: Dict[str, str]) -> Exception:
    """The error a job raises for its diverged members: each one's reason, from its FAILED file (a single run's
    job: that reason alone, as the trainer raised it)."""
    from hkdbench.benchmark.engine.trainer import DivergedError

    reasons = [f"{cfg.run_name()}: {store.run_dir(cfg).failure().get('reason', 'no reason recorded')}"
               for cfg in cfgs if statuses[cfg.run_name()] == "failed"]
    if len(cfgs) == 1:
        return DivergedError(reasons[0].split(": ", 1)[1])
    others = ", ".join(f"{n} {s}" for n, s in statuses.items() if s != "failed")
    return DivergedError(f"cohort {cohort_id(list(statuses))}: {len(reasons)} of {len(cfgs)} runs failed: "
                         + "; ".join(reasons) + (f" (the others: {others})" if others else ""))


def _absolute_plugins(spec: str) -> str:
    """``HKDBENCH_METHODS`` with its .py paths absolute (a worker may start in another directory)."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    return ",".join(str(Path(item).resolve()) if item.endswith(".py") else item for item in items)


def dist_rank() -> int:
    from hkdbench.benchmark.engine.distributed import rank_and_world

    return rank_and_world()[0]
