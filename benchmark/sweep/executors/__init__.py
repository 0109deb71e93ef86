"""The executors a sweep runs its jobs with, one class each (:class:`~.base.Executor`: submit, states, cancel),
one module each, and :data:`EXECUTORS`, the registry. Adding an executor is one module here and one line in
:data:`EXECUTORS` (and, if it takes options of its own, its section in ``sweep/preset.py``'s ``Preset``)."""
from __future__ import annotations

from typing import Dict, Optional, Type

from hkdbench.benchmark.core.config import ConfigError
from hkdbench.benchmark.sweep.executors.base import Executor
from hkdbench.benchmark.sweep.executors.inline import InlineExecutor
from hkdbench.benchmark.sweep.executors.local import LocalExecutor
from hkdbench.benchmark.sweep.executors.slurm import SlurmExecutor

EXECUTORS: Dict[str, Type[Executor]] = {cls.name: cls for cls in (InlineExecutor, LocalExecutor, SlurmExecutor)}


def get_executor(name: str) -> Type[Executor]:
    """The executor's class; an unknown name fails with the known ones."""
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r}; allowed: {', '.join(EXECUTORS)}")
    return EXECUTORS[name]


def executor_of(job: Dict) -> Optional[Type[Executor]]:
    """The executor that wrote a job record (None for a record naming none it knows)."""
    return EXECUTORS.get(job.get("executor"))
