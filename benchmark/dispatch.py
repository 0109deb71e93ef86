"""Dispatching a sweep's runs: inline (in this process, one after the other), local (submitit's LocalExecutor,
a few processes at a time) or Slurm (submitit job arrays), and reading where every run stands.

What is never done: taking a result from ``job.result()``. Every job trains one run in the run store and the
store says what is finished (``DONE``), cut off (a checkpoint), failed (``FAILED`` with its reason) or being
trained (the run's flock). A sweep therefore skips what is done, resumes what has a checkpoint and submits the
rest, and re-submitting a finished sweep runs nothing.

Teachers first: the sweep's distinct teacher runs are one job array; the students' array depends on it
(``--dependency=afterok:<array>``, ``--kill-on-invalid-dep=yes``), and a student job that still finds its teacher
unfinished trains it under the teacher run's flock, so no two jobs ever train the same teacher.

Checkpoint and requeue: a :class:`RunJob` is a ``submitit.helpers.Checkpointable``. Its ``__call__`` trains in
a worker thread while the main thread waits, because submitit calls ``checkpoint()`` from its USR2 handler in
the main thread while ``__call__`` is still running, then requeues the job and exits at once. ``checkpoint()``
sets the stop flag, waits (at most ``stop_wait_s``) for the trainer to finish its current step and save a
mid-epoch checkpoint, and returns a fresh ``RunJob`` for the requeued job, which resumes from the run dir.

Bookkeeping: every submission appends a line to ``<run>/jobs.jsonl`` (job id, executor, log paths) and to the
sweep's ``<runs>/_sweeps/<sweep id>/submissions.jsonl``; ``status`` joins that with the run store and, for Slurm
jobs, with ``squeue``/``sacct``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import submitit

from .config import ConfigError, run_config_from_dict
from .store import RunDir, RunLockedError, RunStore, atomic_write_json, timestamp
from .sweep import Preset, RunSpec, SweepPlan, missing_requirements

EXECUTORS = ("inline", "local", "slurm")
OWNED = "owned"  # a job's outcome when another live process holds its run's lock
ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                       "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


# --------------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------------

class RunJob(submitit.helpers.Checkpointable):
    """Trains one run (resuming it if it has a checkpoint). Picklable: only plain data until it runs."""

    def __init__(self, cfg: Dict[str, Any], runs_dir: str, device: Optional[str] = None, threads: int = 1,
                 stop_wait_s: float = 60.0):
        self.cfg = cfg
        self.runs_dir = str(runs_dir)
        self.device = device
        self.threads = threads
        self.stop_wait_s = stop_wait_s

    def __getstate__(self) -> Dict[str, Any]:  # threads and events never travel
        return {k: self.__dict__[k] for k in ("cfg", "runs_dir", "device", "threads", "stop_wait_s")}

    @property
    def name(self) -> str:
        return run_config_from_dict(self.cfg).run_name()

    def __call__(self) -> Dict[str, Any]:
        import torch

        from . import distributed

        os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        torch.set_num_threads(max(int(self.threads), 1))
        self._stop = threading.Event()
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        if executor in ("local", "slurm") and threading.current_thread() is threading.main_thread():
            # submitit ignores SIGTERM. A local sweep stops its workers with it (Ctrl-C stops them too); Slurm
            # sends it on scancel, on preemption and at the time limit (after the USR2 of --signal, if that came
            # in time): each stops after the current step with a mid-epoch checkpoint, which the requeued job or
            # the next submission of the sweep resumes.
            for sig in (signal.SIGTERM, signal.SIGINT) if executor == "local" else (signal.SIGTERM,):
                signal.signal(sig, self._on_stop_signal)
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
            while self._thread.is_alive():  # the main thread stays free for submitit's signal handlers
                self._thread.join(0.5)
        except KeyboardInterrupt:  # Ctrl-C (inline sweeps): stop after the current step and save
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

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """First stop signal: the trainer finishes its step, saves a mid-epoch checkpoint and the job exits
        (resumable); repeats are ignored, except a second Ctrl-C, which aborts."""
        if self._stop.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self._stop.set()
        print(f"hkdbench: {signal.Signals(signum).name}: stopping {self.name} after the current step (a checkpoint "
              "is saved; re-running the sweep resumes it)", file=sys.stderr, flush=True)

    def _train(self, device, should_stop, dist_ctx) -> None:
        from .trainer import DivergedError, TeacherUnavailableError, Trainer

        cfg = run_config_from_dict(self.cfg)
        store = RunStore(self.runs_dir)
        try:
            result = Trainer(cfg, store, device=device, progress=False, should_stop=should_stop,
                             dist_ctx=dist_ctx).run(resume=True, wait_for_lock=False)
            self._outcome.update(status=result.status, run=result.run_dir.path.name)
        except RunLockedError:  # a racing sweep's job trains this run: leave it to that one, free the slot
            print(f"hkdbench: {cfg.run_name()} is owned by another process (its lock is held); this job exits "
                  "without training it", file=sys.stderr, flush=True)
            self._outcome.update(status=OWNED, run=cfg.run_name())
        except TeacherUnavailableError:  # a stop request arrived while the job was training the teacher
            self._outcome.update(status="interrupted", run=cfg.run_name())
        except BaseException as err:  # noqa: BLE001 -- recorded in the run dir, re-raised by __call__
            if not isinstance(err, DivergedError):  # the trainer has written that reason itself
                self._fail(store, cfg)
            self._outcome["error"] = err

    def _fail(self, store: RunStore, cfg) -> None:
        if dist_rank() != 0:
            return
        rd = store.run_dir(cfg)
        err = sys.exc_info()[1]
        details: Dict[str, Any] = {"traceback": traceback.format_exc(limit=20)}
        try:
            paths = submitit.JobEnvironment().paths
            details.update(job_id=submitit.JobEnvironment().job_id, log=str(paths.stderr))
        except RuntimeError:
            pass
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.mark_failed(f"{type(err).__name__}: {err}", **details)
        if "error" not in self._outcome and err is not None:
            self._outcome["error"] = err

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time-out or preemption), in the main thread while ``__call__`` runs:
        asks the trainer to stop after its current step, waits for the checkpoint to be saved, and hands a
        fresh job to the requeue (which resumes from the run dir)."""
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
            RunJob(self.cfg, self.runs_dir, self.device, self.threads, self.stop_wait_s))


def dist_rank() -> int:
    from .distributed import rank_and_world

    return rank_and_world()[0]


# --------------------------------------------------------------------------------------------------------------
# Run states
# --------------------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    spec: RunSpec
    status: str                       # done / running / queued / partial / pending / failed / cancelled
    reason: str = ""
    log: str = ""
    job_id: str = ""

    @property
    def name(self) -> str:
        return self.spec.name


def read_jobs(rd: RunDir) -> List[Dict[str, Any]]:
    path = rd.path / "jobs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def slurm_states(job_ids: Iterable[str]) -> Dict[str, Tuple[str, str]]:
    """job id -> (state, reason) from squeue (active jobs, array tasks one per line) and sacct (finished)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or shutil.which("squeue") is None:
        return {}
    states: Dict[str, Tuple[str, str]] = {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3 and parts[0] in ids:
                states[parts[0]] = (parts[1], parts[2] if parts[2] not in ("None", "") else "")
        rest = [j for j in ids if j not in states]
        if rest and shutil.which("sacct"):
            out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(rest)],
                                 capture_output=True, text=True, timeout=30)
            for line in out.stdout.splitlines():
                parts = line.strip().split("|")
                if len(parts) >= 3 and parts[0] in rest:
                    states[parts[0]] = (parts[1], f"exit code {parts[2]}" if parts[2] not in ("0:0", "") else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return states


def run_states(specs: Sequence[RunSpec], store: RunStore, query_slurm: bool = True) -> List[RunState]:
    """Where every run stands, from the run store, the job records and (for Slurm jobs) squeue/sacct."""
    dirs = [store.run_dir(s.cfg) for s in specs]
    last_jobs = [(read_jobs(rd) or [None])[-1] for rd in dirs]
    slurm = slurm_states(j["job_id"] for j in last_jobs if j and j.get("executor") == "slurm") \
        if query_slurm else {}
    states = []
    for spec, rd, job in zip(specs, dirs, last_jobs):
        job_id = str(job["job_id"]) if job else ""
        log = job.get("stderr", "") if job else ""
        status = rd.status()
        reason = ""
        if status == "failed":
            failure = rd.failure()
            reason = failure.get("reason", "")
            log = failure.get("log", log) or str(rd.log_file)
        elif status in ("partial", "pending") and job:
            state, why = slurm.get(job_id, ("", "")) if job.get("executor") == "slurm" else _local_state(job)
            word = state.split()[0] if state else ""
            if word in ACTIVE_SLURM_STATES:
                status = "running" if word in ("RUNNING", "COMPLETING") else "queued"
                reason = f"{job['executor']} job {job_id} {state}" + (f" ({why})" if why else "")
            elif word in ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                status = "cancelled" if word == "CANCELLED" else "failed"
                reason = f"{job['executor']} job {job_id} {state}" + (f" ({why})" if why else "")
                error = _job_error(job)
                if error:
                    reason += f": {error}"
            elif word == "COMPLETED":
                status, reason = "failed", f"job {job_id} ended without finishing the run"
        states.append(RunState(spec, status, reason, log, job_id))
    return states


def _local_state(job: Dict[str, Any]) -> Tuple[str, str]:
    """A local job's state from its submitit files (the pid is the job id)."""
    folder = Path(job.get("folder", ""))
    result = folder / f"{job['job_id']}_0_result.pkl"
    if result.exists():
        err = _job_error(job)
        return ("FAILED", err) if err else ("COMPLETED", "")
    try:
        os.kill(int(job["job_id"]), 0)
        return "RUNNING", ""
    except (OSError, ValueError):
        return "CANCELLED", "the process is gone"


def _job_error(job: Dict[str, Any]) -> str:
    """The last line of the exception a job pickled, if any."""
    folder = Path(job.get("folder", ""))
    path = folder / f"{job['job_id']}_0_result.pkl"
    if not path.exists():
        return ""
    try:
        import pickle

        with open(path, "rb") as f:
            kind, payload = pickle.load(f)
    except Exception:  # noqa: BLE001
        return ""
    if kind != "error":
        return ""
    lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    sweep_dir: Path
    submitted: List[Tuple[str, str]]          # (run name, job id)
    skipped: List[RunState]
    folder: Optional[Path] = None
    failed: int = 0
    stopped_by: int = 0                       # the signal that stopped the sweep (its workers saved and exited)

    @property
    def exit_code(self) -> int:
        return 128 + self.stopped_by if self.stopped_by else int(self.failed > 0)


class Sweep:
    def __init__(self, plan: SweepPlan, runs_dir: Optional[str] = None, device: Optional[str] = None,
                 out=None):
        self.plan = plan
        self.preset: Preset = plan.preset
        self.store = RunStore(runs_dir)
        self.root = self.store.root.resolve()
        self.device = device
        self.out = out or sys.stdout
        self.sweep_dir = self.root / "_sweeps" / plan.sweep_id()
        self.folder = self.root / "_submitit"

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    # -- planning -------------------------------------------------------------------------------------------------
    def decide(self, retry_failed: bool = False, query_slurm: bool = True) -> Tuple[List[RunState], List[RunState]]:
        """(to submit, to skip): done runs, queued/running ones and (without ``retry_failed``) failed ones are
        skipped; pending, partial (resumed from their checkpoint) and cancelled ones are submitted."""
        todo, skip = [], []
        for st in run_states(self.plan.runs, self.store, query_slurm):
            if st.status in ("done", "running", "queued") or (st.status == "failed" and not retry_failed):
                skip.append(st)
            else:
                todo.append(st)
        return todo, skip

    def write_manifest(self, executor: Optional[str] = None, command: Optional[str] = None) -> None:
        """``sweep.json``: the preset, every run's config and, one entry per ``run``, when, how (executor) and
        with which command line the sweep was invoked (the report's provenance)."""
        from .config import to_dict

        path = self.sweep_dir / "sweep.json"
        invocations = json.loads(path.read_text()).get("invocations", []) if path.exists() else []
        if executor is not None:
            invocations.append({"time": timestamp(), "executor": executor,
                                "command": command})
        body = {"sweep": self.plan.sweep_id(), "preset": to_dict(self.preset), "runs_dir": str(self.root),
                "invocations": invocations,
                "runs": [{"name": r.name, "kind": r.kind, "teacher_run": r.teacher_run,
                          "cells": [list(c) for c in r.cells], "config": r.cfg.to_dict()}
                         for r in self.plan.runs]}
        atomic_write_json(path, body)

    def dry_run(self, executor: str, retry_failed: bool = False) -> None:
        todo, skip = self.decide(retry_failed, query_slurm=True)
        p = self.preset
        self.say(f"sweep {self.plan.sweep_id()}: preset {p.name}, dataset {p.dataset}, "
                 f"{len(self.plan.cells)} cells = {len(p.pair_list())} pairs x {len(p.methods)} methods x "
                 f"{len(p.seeds)} seeds -> {len(self.plan.students)} student runs + {len(self.plan.teachers)} "
                 f"teacher runs")
        missing = missing_requirements(p)
        if missing:
            self.say(f"note: {', '.join(missing)} must be given at submission (e.g. {missing[0]}=PATH)")
        self.say(f"methods: {', '.join(p.methods)}; seeds: {', '.join(map(str, p.seeds))}")
        self.say("pairs (teacher -> student: student recipe, teacher recipe):")
        from .models import zoo_entry

        for i, (t, s) in enumerate(p.pair_list(), 1):
            specs = [r for r in self.plan.students if (t, s) in {(c[0], c[1]) for c in r.cells}]
            spec = next((r for r in specs if r.cfg.teacher is not None), specs[0])
            t_recipe = spec.cfg.teacher_recipe or (
                f"checkpoint {spec.cfg.teacher.checkpoint}" if spec.cfg.teacher and spec.cfg.teacher.checkpoint else
                f"timm pretrained {spec.cfg.teacher.pretrained}" if spec.cfg.teacher else "-")
            if spec.cfg.teacher_recipe and spec.cfg.teacher.pretrained:
                t_recipe += f" from timm pretrained {spec.cfg.teacher.pretrained}"
            self.say(f"  {i:2d}. {t} ({zoo_entry(t).family}) -> {s} ({zoo_entry(s).family}): {spec.cfg.recipe}, "
                     f"teacher {t_recipe}")
        self.say("")
        self.say(format_state_table(todo + skip, order=self.plan.runs))
        self.say("")
        t_todo = [s for s in todo if s.spec.kind == "teacher"]
        s_todo = [s for s in todo if s.spec.kind == "student"]
        self.say(f"would submit ({executor}): {len(t_todo)} teacher run(s)"
                 + (" as a first job array" if executor == "slurm" and t_todo else "")
                 + f", then {len(s_todo)} student run(s)"
                 + (" as a second job array depending on it (afterok)" if executor == "slurm" and t_todo else ""))
        if executor == "slurm":
            self.say("slurm: " + " ".join(f"{k}={v}" for k, v in _slurm_params(p.slurm, dependency=None).items()))
        self.say(f"skipped: {len(skip)} ({_count(skip)})")

    # -- submission -----------------------------------------------------------------------------------------------
    def run(self, executor: str, retry_failed: bool = False, parallel: int = 0, wait: bool = False,
            command: Optional[str] = None, check_inputs: bool = True) -> SweepResult:
        if executor not in EXECUTORS:
            raise ConfigError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
        missing = missing_requirements(self.preset)
        if missing:
            raise ConfigError(f"preset {self.preset.name} needs {', '.join(missing)} (e.g. {missing[0]}=PATH)")
        if check_inputs:  # off where the data or checkpoints exist only on the compute nodes
            from .preflight import check_sweep_inputs

            check_sweep_inputs(spec.cfg for spec in self.plan.runs)
        todo, skip = self.decide(retry_failed, query_slurm=True)
        self.write_manifest(executor, command)
        self.say(f"sweep {self.plan.sweep_id()}: {len(self.plan.runs)} runs; {len(todo)} to run, "
                 f"{len(skip)} skipped ({_count(skip)}); run store {self.root}")
        for st in todo:
            if st.status == "failed" and retry_failed:
                self.store.run_dir(st.spec.cfg).failed_file.unlink(missing_ok=True)
        teachers = [s.spec for s in todo if s.spec.kind == "teacher"]
        students = [s.spec for s in todo if s.spec.kind == "student"]
        if executor == "inline":
            return self._inline(teachers + students, skip)
        if executor == "local":
            return self._local(teachers, students, skip, parallel)
        return self._slurm(teachers, students, skip, wait)

    def _job(self, spec: RunSpec) -> RunJob:
        threads = self.preset.slurm.cpus_per_task
        return RunJob(spec.cfg.to_dict(), str(self.root), self.device, threads, self.preset.slurm.stop_wait)

    def _record(self, spec: RunSpec, executor: str, job_id: str, stdout: str = "", stderr: str = "") -> None:
        rd = self.store.run_dir(spec.cfg)
        rd.claim(spec.cfg)
        record = {"job_id": job_id, "executor": executor, "sweep": self.plan.sweep_id(), "stdout": stdout,
                  "stderr": stderr, "folder": str(self.folder), "time": timestamp()}
        _append_jsonl(rd.path / "jobs.jsonl", record)
        _append_jsonl(self.sweep_dir / "submissions.jsonl", {**record, "run": spec.name})

    def _taken(self, spec: RunSpec) -> str:
        """Why ``spec`` no longer needs a job (checked again right before submitting it, since a racing sweep
        in the same store may have finished or started it meanwhile), or ''."""
        rd = self.store.run_dir(spec.cfg)
        if rd.is_done:
            return "finished meanwhile by another process"
        if rd.is_locked():  # flock: held only by a live process
            return "owned by another process (its lock is held)"
        return ""

    def _inline(self, specs: List[RunSpec], skip) -> SweepResult:
        failed = 0
        for i, spec in enumerate(specs, 1):
            taken = self._taken(spec)
            if taken:
                self.say(f"[{i}/{len(specs)}] skipped {spec.name}: {taken}")
                continue
            self.say(f"[{i}/{len(specs)}] {spec.name}")
            self._record(spec, "inline", f"inline-{os.getpid()}")
            job = self._job(spec)
            try:
                job()
            except Exception as err:  # noqa: BLE001 -- recorded as FAILED; the sweep goes on
                failed += 1
                self.say(f"  FAILED: {type(err).__name__}: {err}")
        return SweepResult(self.sweep_dir, [(s.name, "inline") for s in specs], skip, None, failed)

    def _local(self, teachers, students, skip, parallel: int) -> SweepResult:
        parallel = parallel or max(1, (os.cpu_count() or 1) // self.preset.slurm.cpus_per_task)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.preset.slurm.cpus_per_task))
        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="local")
        executor.update_parameters(timeout_min=self.preset.slurm.time, tasks_per_node=1)
        submitted: List[Tuple[str, str]] = []
        failed = 0
        self.say(f"local executor: at most {parallel} job(s) at a time; submitit logs in {self.folder}")
        with StopSignals() as stop:
            for phase, specs in (("teacher", teachers), ("student", students)):
                failed += self._local_phase(executor, phase, specs, parallel, submitted, stop)
                if stop.signum:
                    break
        return SweepResult(self.sweep_dir, submitted, skip, self.folder, failed, stop.signum)

    def _local_phase(self, executor, phase: str, specs, parallel: int, submitted, stop: "StopSignals") -> int:
        """Runs one phase's jobs, ``parallel`` at a time; on a stop signal stops the running ones (returns at
        once). Returns how many failed."""
        failed = 0
        queue, running = list(specs), []
        while queue or running:
            if stop.signum:
                self._stop_local_jobs(running, stop.signum)
                return failed
            while queue and len(running) < parallel and not stop.signum:
                spec = queue.pop(0)
                taken = self._taken(spec)
                if taken:  # no worker slot for it
                    self.say(f"skipped {phase} run {spec.name}: {taken}")
                    continue
                with stop.ignoring_sigint():  # the job's processes inherit it: Ctrl-C reaches them only via us
                    job = executor.submit(self._job(spec))
                self._record(spec, "local", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
                submitted.append((spec.name, str(job.job_id)))
                self.say(f"submitted {phase} run {spec.name} as local job {job.job_id}")
                running.append((spec, job))
            time.sleep(0.5)
            for spec, job in list(running):
                if job.done():
                    running.remove((spec, job))
                    rd = self.store.run_dir(spec.cfg)
                    if not rd.is_done and rd.is_locked():
                        self.say(f"left to another process: {spec.name} (job {job.job_id} found its lock "
                                 "held and exited without training it)")
                        continue
                    ok = rd.is_done
                    failed += not ok
                    self.say(f"{'finished' if ok else 'FAILED'}: {spec.name} (job {job.job_id}"
                             + ("" if ok else f", log {job.paths.stderr}") + ")")
        return failed

    def _stop_local_jobs(self, running, signum: int) -> None:
        """Stops the running local jobs cleanly: SIGTERM to each job's controller, which forwards it to the
        worker (its RunJob saves a checkpoint and exits), repeated until they are gone (a worker still starting
        may miss the first); past the trainer's stop wait, kills what is left."""
        name = signal.Signals(signum).name
        self.say(f"{name}: stopping {len(running)} running job(s); each saves a checkpoint and exits, and "
                 "re-running this sweep resumes them")
        deadline = time.monotonic() + self.preset.slurm.stop_wait + 30
        alive = list(running)
        while alive and time.monotonic() < deadline:
            for _, job in alive:
                _signal_pid(int(job.job_id), signal.SIGTERM)
            time.sleep(1.0)
            alive = [(spec, job) for spec, job in alive if not job.done()]
        for spec, job in running:
            if (spec, job) in alive:
                _kill_tree(int(job.job_id))
                self.say(f"killed: {spec.name} (job {job.job_id} did not stop in time; it resumes from its last "
                         "checkpoint)")
            else:
                status = self.store.run_dir(spec.cfg).status()
                self.say(f"stopped: {spec.name} (job {job.job_id}, {status})")

    def _slurm(self, teachers, students, skip, wait: bool) -> SweepResult:
        opts = self.preset.slurm
        submitted: List[Tuple[str, str]] = []
        # teachers still queued or running from an earlier submission: the students wait for those jobs too
        pending_teachers = {st.job_id for st in skip if st.spec.kind == "teacher" and st.status in ("queued", "running")
                            and st.job_id}
        dependency: Optional[str] = None
        if teachers:
            jobs = self._submit_array(teachers, opts, None)
            submitted += [(s.name, j.job_id) for s, j in zip(teachers, jobs)]
            array_id = jobs[0].job_id.split("_")[0]
            self.say(f"submitted {len(jobs)} teacher run(s) as job array {array_id}: "
                     + ", ".join(j.job_id for j in jobs))
            pending_teachers.add(array_id)
        if pending_teachers:
            dependency = "afterok:" + ":".join(sorted(pending_teachers))
        if students:
            jobs = self._submit_array(students, opts, dependency)
            submitted += [(s.name, j.job_id) for s, j in zip(students, jobs)]
            array_id = jobs[0].job_id.split("_")[0]
            self.say(f"submitted {len(jobs)} student run(s) as job array {array_id}"
                     + (f" (dependency {dependency})" if dependency else "") + ": "
                     + ", ".join(j.job_id for j in jobs))
        self.say(f"submitit logs: {self.folder}")
        self.say(f"sweep dir: {self.sweep_dir}  (hkdbench status {self.sweep_dir})")
        result = SweepResult(self.sweep_dir, submitted, skip, self.folder)
        if wait and submitted:
            result.failed = self.wait([n for n, _ in submitted])
        return result

    def _submit_array(self, specs: List[RunSpec], opts, dependency: Optional[str]):
        executor = submitit.AutoExecutor(folder=str(self.folder / "%j"), cluster="slurm",
                                         slurm_max_num_timeout=opts.max_num_timeout)
        executor.update_parameters(**_slurm_params(opts, dependency))
        with executor.batch():
            jobs = [executor.submit(self._job(spec)) for spec in specs]
        for spec, job in zip(specs, jobs):
            self._record(spec, "slurm", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
        return jobs

    def wait(self, names: Sequence[str], poll_s: float = 2.0) -> int:
        """Waits until none of the runs is queued or running; returns how many did not finish."""
        specs = [s for s in self.plan.runs if s.name in set(names)]
        while True:
            states = run_states(specs, self.store)
            if not any(s.status in ("queued", "running") for s in states):
                return sum(s.status != "done" for s in states)
            time.sleep(poll_s)


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


def _slurm_params(opts, dependency: Optional[str]) -> Dict[str, Any]:
    additional: Dict[str, Any] = {}
    for flag in opts.extra:
        key, _, value = flag[2:].partition("=")
        additional[key.replace("-", "_")] = value if value else True
    if dependency:
        additional["dependency"] = dependency
        additional["kill_on_invalid_dep"] = "yes"
    params: Dict[str, Any] = {
        "name": opts.job_name, "timeout_min": opts.time, "nodes": 1, "tasks_per_node": opts.tasks,
        "cpus_per_task": opts.cpus_per_task, "slurm_signal_delay_s": opts.signal_delay_s,
        "slurm_array_parallelism": opts.array_parallelism,
        "slurm_setup": [f"export OMP_NUM_THREADS={opts.cpus_per_task}"],
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(opts, key):
            params[f"slurm_{key}"] = getattr(opts, key)
    if additional:
        params["slurm_additional_parameters"] = additional
    return params


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------

STATUS_ORDER = ("done", "running", "queued", "partial", "pending", "failed", "cancelled")


def _count(states: Sequence[RunState]) -> str:
    counts = {s: sum(st.status == s for st in states) for s in STATUS_ORDER}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"


def format_state_table(states: Sequence[RunState], order: Optional[Sequence[RunSpec]] = None,
                       details: bool = True) -> str:
    if order is not None:
        rank = {s.name: i for i, s in enumerate(order)}
        states = sorted(states, key=lambda st: rank.get(st.name, 1 << 30))
    rows = [("status", "kind", "method", "teacher", "student", "seed", "job", "run")]
    for st in states:
        cfg = st.spec.cfg
        rows.append((st.status, st.spec.kind, cfg.method if st.spec.kind == "student" else "-",
                     cfg.teacher.name if cfg.teacher else "-", cfg.student.name, str(cfg.train.seed),
                     st.job_id or "-", st.name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if details:
        for st in states:
            if st.status in ("failed", "cancelled") or (st.status == "queued" and "NeverSatisfied" in st.reason):
                lines.append(f"  {st.name}: {st.status}: {st.reason or 'no reason recorded'}"
                             + (f"\n      log: {st.log}" if st.log else ""))
    lines.append(f"{len(states)} runs: {_count(states)}")
    return "\n".join(lines)
