"""The Slurm executor: submitit job arrays, the teachers' first, then the students', one array task per student
run or, with ``sweep --cohort``, per cohort. A student task waits for its own teacher's job only
(``--dependency=afterok:<array>_<task>``, ``--kill-on-invalid-dep=yes``), the student alone for the teachers its
CKA is probed against (``train.probe_teachers``, when the sweep probes): the students of one teacher form one
array, so a slow teacher holds back only its own students. A student job that still finds its teacher unfinished
trains it under the teacher run's flock, so no two jobs ever train the same teacher."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import submitit

from hkdbench.benchmark.sweep.dispatch import SubmitOptions, Sweep, SweepResult
from hkdbench.benchmark.sweep.plan import Cohort
from hkdbench.benchmark.sweep.status import RunState


def submit(sweep: Sweep, teachers: List[Cohort], students: List[Cohort], skip: List[RunState],
           options: SubmitOptions) -> SweepResult:
    opts = sweep.preset.slurm
    submitted: List[Tuple[str, str]] = []
    # each teacher run's job: still queued or running from an earlier submission, or submitted now
    teacher_jobs = {st.spec.name: st.job_id for st in skip
                    if st.spec.kind == "teacher" and st.status in ("queued", "running") and st.job_id}
    if teachers:
        jobs = _submit_array(sweep, teachers, opts, None)
        submitted += [(c.names[0], j.job_id) for c, j in zip(teachers, jobs)]
        teacher_jobs.update({c.names[0]: str(j.job_id) for c, j in zip(teachers, jobs)})
        array_id = jobs[0].job_id.split("_")[0]
        sweep.say(f"submitted {len(jobs)} teacher run(s) as job array {array_id}: "
                  + ", ".join(j.job_id for j in jobs))
    for dependency, group in _by_dependency(students, teacher_jobs):
        jobs = _submit_array(sweep, group, opts, dependency)
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


def _by_dependency(students: List[Cohort], teacher_jobs: Dict[str, str]) -> List[Tuple[Optional[str], List[Cohort]]]:
    """The student jobs grouped by the teacher jobs they wait for (``afterok:<job>[:<job>]``; None: their teachers
    are done, or they have none), in order of first appearance."""
    groups: Dict[Optional[str], List[Cohort]] = {}
    for cohort in students:
        needed = sorted({teacher_jobs[t] for s in cohort.specs for t in s.needs if t in teacher_jobs})
        groups.setdefault("afterok:" + ":".join(needed) if needed else None, []).append(cohort)
    return list(groups.items())


def _submit_array(sweep, cohorts: List[Cohort], opts, dependency: Optional[str]):
    """One array task per run or cohort."""
    executor = submitit.AutoExecutor(folder=str(sweep.folder / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=opts.max_num_timeout)
    executor.update_parameters(**_slurm_params(opts, dependency))
    with executor.batch():
        jobs = [executor.submit(sweep.job(cohort)) for cohort in cohorts]
    for cohort, job in zip(cohorts, jobs):
        sweep.record(cohort, "slurm", str(job.job_id), str(job.paths.stdout), str(job.paths.stderr))
    return jobs


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


def dry_run_note(sweep: Sweep) -> str:
    """What a dry run says about the submission: the sbatch parameters."""
    return "slurm: " + " ".join(f"{k}={v}" for k, v in _slurm_params(sweep.preset.slurm, dependency=None).items())
