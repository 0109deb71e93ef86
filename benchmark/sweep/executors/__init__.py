"""The executors a sweep submits its runs with, one module each, behind one interface:

``submit(sweep, teachers, students, skip, options) -> SweepResult`` runs or submits the jobs to do (teachers first;
each job a ``plan.Cohort``: one run, or with ``sweep --cohort`` the student runs trained together), and an
optional ``dry_run_note(sweep) -> str`` adds what a dry run says about the submission. Adding an executor is one
module here and one entry in :data:`EXECUTORS`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from hkdbench.benchmark.core.config import ConfigError

EXECUTORS = {"inline": "in this process, one run after the other",
             "local": "local processes (submitit), --parallel at a time",
             "slurm": "Slurm job arrays (submitit), teachers first"}


def get_executor(name: str) -> ModuleType:
    """The executor's module; an unknown name fails with the known ones."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
    return importlib.import_module(f"{__name__}.{name}")
