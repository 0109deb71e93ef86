"""The Slurm executor: submitit job arrays, the teachers' first, then the students', one array task per student
run or, with ``sweep --cohort``, per cohort. A student task waits for its own teacher's job only
(``--dependency=afterok:<array>_<task>``, ``--kill-on-invalid-dep=yes``), the student alone for the teachers its
CKA is probed against (``train.probe_teachers``, when the sweep probes): the students of one teacher form one
array, so a slow teacher holds back only its own students. A student job that still finds its teacher unfinished
trains it under the teacher run's flock, so no two jobs ever train the same teacher."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import submitit

from hkdbench.benchmark.sweep.executors.base import JobRecord, SubmititExecutor, SubmitOptions, SweepResult

if TYPE_CHECKING:
    from hkdbench.benchmark.sweep.plan import Cohort


@dataclass(frozen=True)
class SlurmOptions:
    """The preset's ``slurm:`` section (``slurm.<field>=value`` on the command line); ``cpus_per_task``, ``time`` and
    ``stop_wait_s`` size every job, local ones included."""
    partition: Optional[str] = None
    time: int = 60                      # minutes (the job's time limit; submitit requeues on timeout)
    gpus_per_node: int = 0              # > 1: one process per GPU with DDP
    tasks_per_node: int = 0             # processes per job (0: one per GPU, at least one); > 1 without GPUs: gloo
    cpus_per_task: int = 1
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    array_parallelism: int = 64
    signal_delay_s: int = 120           # --signal=USR2@N: the checkpoint lead time before the time limit
    stop_wait_s: float = 0.0            # how long checkpoint() waits for the trainer to save (0: signal_delay_s - 15)
    max_num_timeout: int = 3            # requeues after time-outs (preemptions do not count)
    extra: Tuple[str, ...] = ()         # more sbatch flags, e.g. ["--exclusive", "--nice=10"]
    job_name: str = "hkdbench"

    def __post_init__(self):
        if self.time < 1:
            raise ValueError(f"slurm.time must be >= 1 minute, got {self.time}")
        if self.gpus_per_node < 0 or self.cpus_per_task < 1 or self.array_parallelism < 1:
            raise ValueError("slurm.gpus_per_node must be >= 0, slurm.cpus_per_task and slurm.array_parallelism >= 1")
        if self.signal_delay_s < 0:
            raise ValueError(f"slurm.signal_delay_s must be >= 0, got {self.signal_delay_s}")
        if self.tasks_per_node < 0 or self.max_num_timeout < 0:
            raise ValueError("slurm.tasks_per_node and slurm.max_num_timeout must be >= 0")
        if self.mem_gb is not None and not 0 < self.mem_gb < float("inf"):
            raise ValueError(f"slurm.mem_gb must be a finite number > 0 (or null: the partition's default), got "
                             f"{self.mem_gb}")
        if not 0 <= self.stop_wait_s < float("inf"):
            raise ValueError(f"slurm.stop_wait_s must be a finite number >= 0 (0: signal_delay_s - 15), got "
                             f"{self.stop_wait_s}")
        for flag in self.extra:
            if not flag.startswith("--"):
                raise ValueError(f"slurm.extra: sbatch flags are given as '--name' or '--name=value', got {flag!r}")

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def stop_wait(self) -> float:
        return self.stop_wait_s if self.stop_wait_s > 0 else max(self.signal_delay_s - 15, 5)


class SlurmExecutor(SubmititExecutor):
    name = "slurm"
    description = "Slurm job arrays (submitit), teachers first"
    options_section = "slurm"
    teachers_submitted_as = " as a first job array"
    students_submitted_as = " as job arrays, each after its own teacher's task (afterok)"

    def submit(self, teachers, students, skip, options: SubmitOptions) -> SweepResult:
        sweep = self.sweep
        submitted: List[Tuple[str, str]] = []
        # each teacher run's job: still queued or running from an earlier submission, or submitted now
        teacher_jobs = {st.spec.name: st.job_id for st in skip
                        if st.spec.kind == "teacher" and st.status in ("queued", "running") and st.job_id}
        if teachers:
            jobs = self._submit_array(teachers, None)
            submitted += [(c.names[0], j.job_id) for c, j in zip(teachers, jobs)]
            teacher_jobs.update({c.names[0]: str(j.job_id) for c, j in zip(teachers, jobs)})
            array_id = jobs[0].job_id.split("_")[0]
            sweep.say(f"submitted {len(jobs)} teacher run(s) as job array {array_id}: "
                      + ", ".join(j.job_id for j in jobs))
        for dependency, group in _by_dependency(students, teacher_jobs):
            jobs = self._submit_array(group, dependency)
            submitted += [(name, j.job_id) for c, j in zip(group, jobs) for name in c.names]
            array_id = jobs[0].job_id.split("_")[0]
            runs = sum(len(c.specs) for c in group)
            sweep.say(f"submitted {runs} student run(s)" + (f" in {len(jobs)} cohort(s)" if sweep.cohort else "")
                      + f" as job array {array_id}"
                      + (f" (dependency {dependency})" if dependency else "") + ": "
                      + ", ".join(j.job_id for j in jobs))
        sweep.say(f"submitit logs: {sweep.folder}")
        sweep.say(f"sweep dir: {sweep.sweep_dir}  (hkdbench status {sweep.sweep_dir})")
        result = SweepResult(sweep.sweep_dir, submitted, skip, sweep.folder)
        if options.wait and submitted:
            result.failed = sweep.wait([n for n, _ in submitted])
        return result

    def _submit_array(self, cohorts: List[Cohort], dependency: Optional[str]):
        """One array task per run or cohort."""
        sweep, opts = self.sweep, self.options
        executor = submitit.AutoExecutor(folder=str(sweep.folder / "%j"), cluster="slurm",
                                         slurm_max_num_timeout=opts.max_num_timeout)
        executor.update_parameters(**_slurm_params(opts, dependency))
        with executor.batch():
            jobs = [executor.submit(sweep.job(cohort)) for cohort in cohorts]
        for cohort, job in zip(cohorts, jobs):
            sweep.record(cohort, self.name, str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
        return jobs

    def dry_run_note(self) -> str:
        """The sbatch parameters."""
        return "slurm: " + " ".join(f"{k}={v}" for k, v in _slurm_params(self.options, dependency=None).items())

    @classmethod
    def states(cls, jobs: Sequence[JobRecord]) -> Dict[str, Tuple[str, str]]:
        """From squeue (active jobs, array tasks one per line) and sacct (finished ones)."""
        ids = sorted({str(job.get("job_id")) for job in jobs if job.get("job_id")})
        if not ids or shutil.which("squeue") is None:
            return {}
        states: Dict[str, Tuple[str, str]] = {}
        try:
            states.update(_squeue(ids))
            rest = [j for j in ids if j not in states]
            if rest and shutil.which("sacct"):
                states.update(_sacct(rest))
        except (OSError, subprocess.TimeoutExpired):
            pass  # what squeue said, if anything
        return states

    @classmethod
    def cancel(cls, jobs: Sequence[JobRecord]) -> List[str]:
        """scancel: Slurm sends SIGTERM, on which each job saves a checkpoint and exits."""
        ids = sorted({str(job.get("job_id")) for job in jobs if job.get("job_id")})
        if ids:
            subprocess.run(["scancel", *ids], check=True, capture_output=True, text=True, timeout=60)
        return ids


def _squeue(ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in ids:
            states[parts[0]] = (parts[1], parts[2] if parts[2] not in ("None", "") else "")
    return states


def _sacct(ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", ",".join(ids)],
                         capture_output=True, text=True, timeout=30)
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 3 and parts[0] in ids:
            states[parts[0]] = (parts[1], f"exit code {parts[2]}" if parts[2] not in ("0:0", "") else "")
    return states


def _by_dependency(students: List[Cohort], teacher_jobs: Dict[str, str]) -> List[Tuple[Optional[str], List[Cohort]]]:
    """The student jobs grouped by the teacher jobs they wait for (``afterok:<job>[:<job>]``; None: their teachers
    are done, or they have none), in order of first appearance."""
    groups: Dict[Optional[str], List[Cohort]] = {}
    for cohort in students:
        needed = sorted({teacher_jobs[t] for s in cohort.specs for t in s.needs if t in teacher_jobs})
        groups.setdefault("afterok:" + ":".join(needed) if needed else None, []).append(cohort)
    return list(groups.items())


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
