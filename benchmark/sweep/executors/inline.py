"""The inline executor: every job in this process, one after the other (teachers first); a failed run is recorded
as FAILED and the sweep goes on."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.sweep.executors.base import Executor, JobRecord, SubmitOptions, SweepResult


class InlineExecutor(Executor):
    name = "inline"
    description = "in this process, one run after the other"

    def submit(self, teachers, students, skip, options: SubmitOptions) -> SweepResult:
        sweep = self.sweep
        jobs = teachers + students
        job_id = f"inline-{os.getpid()}"
        submitted, failed = [], 0
        for i, planned in enumerate(jobs, 1):
            cohort = sweep.untaken(planned, prefix=f"[{i}/{len(jobs)}] ")
            if cohort is None:
                continue
            job = sweep.job(cohort)
            sweep.say(f"[{i}/{len(jobs)}] {job.name}")
            sweep.record(cohort, self.name, job_id)
            submitted += [(name, self.name) for name in cohort.names]
            try:
                job()
            except Exception as err:  # noqa: BLE001 -- recorded as FAILED; the sweep goes on
                sweep.say(f"  FAILED: {type(err).__name__}: {err}")
            failed += sweep.report_members(cohort, job_id)
        return SweepResult(sweep.sweep_dir, submitted, skip, None, failed)

    @classmethod
    def states(cls, jobs: Sequence[JobRecord]) -> Dict[str, Tuple[str, str]]:
        """A run an inline job left unfinished was cut off with the sweep's process."""
        return {str(job.get("job_id")): ("CANCELLED", "the process is gone") for job in jobs}

    @classmethod
    def cancel(cls, jobs: Sequence[JobRecord]) -> List[str]:
        if jobs:
            raise ConfigError("an inline job runs in its sweep's own process: stop that process (Ctrl-C saves a "
                              "checkpoint)")
        return []
