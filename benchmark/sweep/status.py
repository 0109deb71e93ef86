"""Where every run of a sweep stands: the run store's status joined with the job records (``jobs.jsonl``) and
what the executor of each job says of it (``Executor.states``: Slurm's from ``squeue``/``sacct``, local ones from
their submitit files and processes); stopping them (:func:`cancel`). And the status table, with the cohort
each run last trained in (``sweep --cohort``) and each cohort's members."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hkdbench.benchmark.core.store import RunStore
from hkdbench.benchmark.sweep.executors import executor_of
from hkdbench.benchmark.sweep.job import OWNED
from hkdbench.benchmark.sweep.plan import RunSpec


ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                       "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


@dataclass
class RunState:
    spec: RunSpec
    status: str                       # done / running / queued / partial / pending / failed / cancelled
    reason: str = ""
    log: str = ""
    job_id: str = ""
    cohort: Optional[Dict[str, Any]] = None   # the last job's cohort ({"id", "runs"}), if it trained in one

    @property
    def name(self) -> str:
        return self.spec.name


def run_states(specs: Sequence[RunSpec], store: RunStore) -> List[RunState]:
    """Where every run stands, from the run store, the job records and the executors that ran the jobs."""
    dirs = [store.run_dir(s.cfg) for s in specs]
    last_jobs = [_last_job(rd.jobs(), rd.path.name) for rd in dirs]
    job_states = _job_states([j for j in last_jobs if j])
    states = []
    for spec, rd, job in zip(specs, dirs, last_jobs):
        job_id = str(job.get("job_id", "")) if job else ""
        log = job.get("stderr", "") if job else ""
        status = rd.status()
        reason = ""
        if status == "failed":
            failure = _failure(rd)
            reason = failure.get("reason", "")
            log = failure.get("log", log) or str(rd.log_file)
        elif status in ("partial", "pending") and job:
            state, why = job_states.get((job.get("executor"), job_id), ("", ""))
            word = state.split()[0] if state else ""
            if word in ACTIVE_SLURM_STATES:
                status = "running" if word in ("RUNNING", "COMPLETING") else "queued"
                reason = f"{job.get('executor')} job {job_id} {state}" + (f" ({why})" if why else "")
            elif word in ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"):
                status = "cancelled" if word == "CANCELLED" else "failed"
                reason = f"{job.get('executor')} job {job_id} {state}" + (f" ({why})" if why else "")
                error = _error(job)
                if error:
                    reason += f": {error}"
            elif word == "COMPLETED":
                status, reason = "failed", f"job {job_id} ended without finishing the run"
        states.append(RunState(spec, status, reason, log, job_id, job.get("cohort") if job else None))
    return states


def _failure(rd) -> Dict[str, Any]:
    """A failed run's FAILED record; a damaged one says so as the reason."""
    try:
        failure = rd.failure()
    except (ValueError, OSError) as err:  # not JSON, not readable
        return {"reason": f"its FAILED record {rd.failed_file} is damaged ({type(err).__name__}); the reason is lost"}
    return failure if isinstance(failure, dict) else {"reason": f"its FAILED record {rd.failed_file} is damaged"}


def _job_states(jobs: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str], Tuple[str, str]]:
    """(executor, job id) -> (state, reason): each job as the executor that ran it tells it (a record naming no
    executor it knows: no state, the store's status stands)."""
    by_executor: Dict[str, List[Dict[str, Any]]] = {}
    for job in jobs:
        by_executor.setdefault(job.get("executor"), []).append(job)
    states = {}
    for name, records in by_executor.items():
        executor = executor_of(records[0])
        if executor is None:
            continue
        states.update({(name, job_id): state for job_id, state in executor.states(records).items()})
    return states


def _outcome(job: Dict[str, Any]) -> Optional[Tuple[str, Any]]:
    executor = executor_of(job)
    return executor.outcome(job) if executor else None


def _error(job: Dict[str, Any]) -> str:
    executor = executor_of(job)
    return executor.error(job) if executor else ""


def _last_job(jobs: List[Dict[str, Any]], run: str) -> Optional[Dict[str, Any]]:
    """The run's job: its last job record, less those of jobs that found the run owned (locked by another
    process's job, which trained it) and exited without training it."""
    for job in reversed(jobs):
        outcome = _outcome(job)
        if not (outcome and outcome[0] == "success" and _owned(outcome[1], run)):
            return job
    return None


def _owned(outcome: Any, run: str) -> bool:
    """Whether a job's return value (``RunJob``'s: a run's status, or a cohort's ``runs``) says ``run`` was owned."""
    if not isinstance(outcome, dict):
        return False
    runs = outcome.get("runs") if isinstance(outcome.get("runs"), dict) else {outcome.get("run"): outcome.get("status")}
    return runs.get(run) == OWNED


def cancel(states: Sequence[RunState], store: RunStore) -> List[str]:
    """Stops the jobs of the runs that are queued or running (each saves a checkpoint where its executor can);
    returns the job ids reached."""
    jobs: Dict[str, List[Dict[str, Any]]] = {}
    for st in states:
        job = _last_job(store.run_dir(st.spec.cfg).jobs(), st.name) if st.status in ("queued", "running") else None
        if job is not None:
            jobs.setdefault(job.get("executor"), []).append(job)
    return [job_id for records in jobs.values() for job_id in executor_of(records[0]).cancel(records)]


STATUS_ORDER = ("done", "running", "queued", "partial", "pending", "failed", "cancelled")


def _count(states: Sequence[RunState]) -> str:
    counts = {s: sum(st.status == s for st in states) for s in STATUS_ORDER}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "none"


def format_state_table(states: Sequence[RunState], order: Optional[Sequence[RunSpec]] = None,
                       details: bool = True) -> str:
    if order is not None:
        rank = {s.name: i for i, s in enumerate(order)}
        states = sorted(states, key=lambda st: rank.get(st.name, 1 << 30))
    with_cohorts = any(st.cohort for st in states)
    rows = [("status", "kind", "method", "teacher", "student", "seed", "job") + ("cohort",) * with_cohorts
            + ("run",)]
    for st in states:
        cfg = st.spec.cfg
        rows.append((st.status, st.spec.kind, cfg.method if st.spec.kind == "student" else "-",
                     cfg.teacher.name if cfg.teacher else "-", cfg.student.name, str(cfg.train.seed),
                     st.job_id or "-") + ((st.cohort or {}).get("id", "-"),) * with_cohorts + (st.name,))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += _cohort_lines(states)
    if details:
        for st in states:
            if st.status in ("failed", "cancelled") or (st.status == "queued" and "NeverSatisfied" in st.reason):
                lines.append(f"  {st.name}: {st.status}: {st.reason or 'no reason recorded'}"
                             + (f"\n      log: {st.log}" if st.log else ""))
    lines.append(f"{len(states)} runs: {_count(states)}")
    return "\n".join(lines)


def _cohort_lines(states: Sequence[RunState]) -> List[str]:
    """One line per cohort the runs last trained in: its job, its members' states and their methods (members
    that have since trained in another job are not counted)."""
    by_id: Dict[str, List[RunState]] = {}
    for st in states:
        if st.cohort:
            by_id.setdefault(st.cohort["id"], []).append(st)
    lines = []
    for cohort_id, members in by_id.items():
        listed = len(members[0].cohort.get("runs", members))
        methods = ", ".join(f"{m.spec.cfg.method} {m.status}" for m in members)
        lines.append(f"  cohort {cohort_id} (job {members[0].job_id}, {listed} runs): {methods}")
    return lines
