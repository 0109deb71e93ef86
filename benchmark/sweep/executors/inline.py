"""The inline executor: every run in this process, one after the other (teachers first); a failed run is recorded
as FAILED and the sweep goes on."""
from __future__ import annotations

import os
from typing import List

from hkdbench.benchmark.sweep.dispatch import SubmitOptions, Sweep, SweepResult
from hkdbench.benchmark.sweep.plan import RunSpec
from hkdbench.benchmark.sweep.status import RunState


def submit(sweep: Sweep, teachers: List[RunSpec], students: List[RunSpec], skip: List[RunState],
           options: SubmitOptions) -> SweepResult:
    specs = teachers + students
    failed = 0
    for i, spec in enumerate(specs, 1):
        taken = sweep.taken(spec)
        if taken:
            sweep.say(f"[{i}/{len(specs)}] skipped {spec.name}: {taken}")
            continue
        sweep.say(f"[{i}/{len(specs)}] {spec.name}")
        sweep.record(spec, "inline", f"inline-{os.getpid()}")
        job = sweep.job(spec)
        try:
            job()
        except Exception as err:  # noqa: BLE001 -- recorded as FAILED; the sweep goes on
            failed += 1
            sweep.say(f"  FAILED: {type(err).__name__}: {err}")
    return SweepResult(sweep.sweep_dir, [(s.name, "inline") for s in specs], skip, None, failed)
