"""The inline executor: every job in this process, one after the other (teachers first); a failed run is recorded
as FAILED and the sweep goes on."""
from __future__ import annotations

import os
from typing import List

from hkdbench.benchmark.sweep.dispatch import SubmitOptions, Sweep, SweepResult
from hkdbench.benchmark.sweep.plan import Cohort
from hkdbench.benchmark.sweep.status import RunState


def submit(sweep: Sweep, teachers: List[Cohort], students: List[Cohort], skip: List[RunState],
           options: SubmitOptions) -> SweepResult:
    jobs = teachers + students
    job_id = f"inline-{os.getpid()}"
    submitted, failed = [], 0
    for i, planned in enumerate(jobs, 1):
        cohort = sweep.untaken(planned, prefix=f"[{i}/{len(jobs)}] ")
        if cohort is None:
            continue
        job = sweep.job(cohort)
        sweep.say(f"[{i}/{len(jobs)}] {job.name}")
        sweep.record(cohort, "inline", job_id)
        submitted += [(name, "inline") for name in cohort.names]
        try:
            job()
        except Exception as err:  # noqa: BLE001 -- recorded as FAILED; the sweep goes on
            sweep.say(f"  FAILED: {type(err).__name__}: {err}")
        failed += sweep.report_members(cohort, job_id)
    return SweepResult(sweep.sweep_dir, submitted, skip, None, failed)
