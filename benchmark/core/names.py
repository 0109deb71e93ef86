"""The names of the run store's runs: one rule, by the run's kind.

A run's directory is named by what it is, for people, then by its hash, which alone identifies it (the hash does not
include the name). Only the store (core/store.py re-exports these) and this module build or read a name: everything
else asks the store for a run's directory. This module imports nothing of the config, so that the config can name a
run (``RunConfig.run_name()``) while the store, which reads configs back, sits above it.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:
    from hkdbench.benchmark.core.config import OverheadConfig, RunConfig

OVERHEAD_KIND = "overhead"  # the kind of a run of the overhead benchmark (benchmark/tools/overhead.py)

TEACHER_RUN = "teacher"    # teacher_<model>_<dataset>_s<seed>_<hash>: a teacher trained for students to distil from
# student_<model>_<dataset>_s<seed>_<hash>: the student trained alone (method 'none', no teacher), the same plain
# training as a teacher run's but of a student, which is what its role says and what the name mirrors
STUDENT_ALONE = "student"


def run_name(cfg: RunConfig | OverheadConfig) -> str:
    """The one naming rule of the store's runs, by the run's kind."""
    if cfg.kind == OVERHEAD_KIND:
        device_type = cfg.device.split(":")[0]  # cuda:1 -> cuda, as torch.device(...).type
        return (f"{OVERHEAD_KIND}_{cfg.method}_{cfg.teacher}_to_{cfg.student}_b{cfg.batch_size}_{cfg.img_size}px_"
                f"{device_type}_{cfg.run_hash()}")
    return f"{_what_is_trained(cfg)}_{_trained_on(cfg)}"


def _what_is_trained(cfg: RunConfig) -> str:
    if cfg.kind == TEACHER_RUN:
        return f"{TEACHER_RUN}_{cfg.student.name}"
    if cfg.teacher is None:  # a method other than 'none' that uses no teacher keeps its name in front
        return f"{STUDENT_ALONE if cfg.method == 'none' else cfg.method}_{cfg.student.name}"
    return f"{cfg.method}_{cfg.teacher.name}_to_{cfg.student.name}"


def _trained_on(cfg: RunConfig) -> str:
    return f"{cfg.data.dataset}_s{cfg.train.seed}_{cfg.run_hash()}"


def legacy_run_names(cfg: RunConfig | OverheadConfig) -> List[str]:
    """The names the run had in earlier versions of the store: a run without a teacher was
    ``<method>_none_to_<student>_...`` (``none`` for the missing teacher), so ``none_none_to_...`` for the student
    alone. Its hash is the same, so the store finds a run stored under such a name and never trains it again."""
    if cfg.kind == OVERHEAD_KIND or cfg.kind == TEACHER_RUN or cfg.teacher is not None:
        return []
    return [f"{cfg.method}_none_to_{cfg.student.name}_{_trained_on(cfg)}"]


def first_run_name(cfg: RunConfig | OverheadConfig) -> str:
    """The name the run was first given: its legacy name where it has one (:func:`legacy_run_names`), else its name.
    Ids made of run names (a sweep's) take it, so that a renaming leaves them, and the records kept under them, as
    they were."""
    return (legacy_run_names(cfg) or [run_name(cfg)])[0]


def is_teacher_run_name(name: str) -> bool:
    """Whether ``name`` (e.g. of ``train.probe_teachers``) is a teacher run's."""
    return name.startswith(f"{TEACHER_RUN}_")


def teacher_model_from_name(name: str, dataset: str) -> Optional[str]:
    """The model a teacher run trained, read from its name (``teacher_<model>_<dataset>_s<seed>_<hash>``) taking it
    to have trained on ``dataset``: for a teacher run that is no longer in the store. None when the name is not one."""
    hit = re.fullmatch(rf"{TEACHER_RUN}_(.+)_{re.escape(str(dataset))}_s\d+_[0-9a-f]+", name)
    return hit.group(1) if hit else None
