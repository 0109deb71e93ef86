"""A preset expanded into runs: every (pair, method, seed) cell resolved to its run config, the distinct student
runs and the teacher runs they need (trained first); and the runs to do split into jobs (:class:`Cohort`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from hkdbench.benchmark.core.config import ConfigError, RunConfig, deep_merge, flatten
from hkdbench.benchmark.core.store import first_run_name
from hkdbench.benchmark.sweep.preset import Preset


@dataclass
class RunSpec:
    """One run of a sweep: its resolved config and the grid cells (teacher, student, method, seed) it serves
    (the student-alone baseline serves every teacher of its student)."""
    cfg: RunConfig
    kind: str                           # 'teacher' or 'student'
    teacher_run: Optional[str] = None   # the name of the teacher run a student run needs (trained by the sweep)
    cells: List[Tuple[str, str, str, int]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cfg.run_name()

    @property
    def needs(self) -> List[str]:
        """The teacher runs this run waits for: its own teacher's, or those its CKA is probed against."""
        return ([self.teacher_run] if self.teacher_run else []) + list(self.cfg.train.probe_teachers)


@dataclass
class SweepPlan:
    preset: Preset
    cells: List[Tuple[str, str, str, int]]      # (teacher, student, method, seed), in grid order
    teachers: List[RunSpec]                     # the distinct teacher runs, trained first
    students: List[RunSpec]                     # the distinct student runs

    @property
    def runs(self) -> List[RunSpec]:
        return self.teachers + self.students

    def digest(self) -> str:
        names = sorted(first_run_name(r.cfg) for r in self.runs)
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:10]

    def sweep_id(self) -> str:
        return f"{self.preset.name}-{self.digest()}"


def expand(p: Preset) -> SweepPlan:
    """Every (pair, method, seed) cell resolved to its run config; the distinct teacher runs they need."""
    from hkdbench.benchmark.models.pretrained import warn_scratch_imagenet_teacher
    from hkdbench.benchmark.engine.teacher import teacher_source
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    cells: List[Tuple[str, str, str, int]] = []
    students: Dict[str, RunSpec] = {}
    teachers: Dict[str, RunSpec] = {}
    t_overrides = flatten(p.teacher_overrides)
    for t, s in p.pair_list():
        for m in p.methods:
            for seed in p.seeds:
                cell = (t, s, m, seed)
                cells.append(cell)
                body = deep_merge(p.overrides, {"train": {"seed": seed}})
                if m in p.method_overrides:
                    body = {**body, "method": p.method_overrides[m]}
                ckpt = p.teacher_checkpoints.get(t)
                try:
                    cfg = resolve_run_config(kind="student", student=s, teacher=t, method=m, dataset=p.dataset,
                                             recipe=p.recipe, teacher_checkpoint=str(ckpt) if ckpt else None,
                                             teacher_recipe=p.teacher_recipe, overrides=body,
                                             teacher_overrides=t_overrides,
                                             teacher_pretrained=p.teacher_pretrained.get(t))
                except (ConfigError, KeyError, ValueError) as err:
                    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                    raise ConfigError(f"preset {p.name}, run {m} {t} -> {s} seed {seed}: {message}") from None
                name = cfg.run_name()
                spec = students.get(name)
                if spec is None:
                    spec = students[name] = RunSpec(cfg, "student")
                    source = teacher_source(cfg)
                    if source is not None and source.is_run:  # the teacher is trained
                        t_cfg = source.run_config
                        t_name = t_cfg.run_name()
                        if t_name not in teachers:
                            warn_scratch_imagenet_teacher(t_cfg)
                        teachers.setdefault(t_name, RunSpec(t_cfg, "teacher"))
                        teachers[t_name].cells.append(cell)
                        spec.teacher_run = t_name
                spec.cells.append(cell)
    return SweepPlan(p, cells, list(teachers.values()), _probing_teachers(list(students.values())))


def _probing_teachers(students: List[RunSpec]) -> List[RunSpec]:
    """The student runs with each CKA-probed run that has no teacher of its own (the student alone) probed against
    the teacher runs of the cells it serves (``train.probe_teachers``): the reference of the CKA-change figure. A
    cell whose teacher is not trained by the sweep (a checkpoint, timm weights as they are) has no run to name."""
    from hkdbench.benchmark.engine.cohort import probed_against

    trained_by = {(t, s, seed): spec.teacher_run for spec in students if spec.teacher_run
                  for t, s, _, seed in spec.cells}
    out = []
    for spec in students:
        names = sorted({trained_by[t, s, seed] for t, s, _, seed in spec.cells if (t, s, seed) in trained_by})
        cfg = probed_against(spec.cfg, names)
        out.append(spec if cfg is spec.cfg else RunSpec(cfg, spec.kind, spec.teacher_run, spec.cells))
    return out


@dataclass
class Cohort:
    """The runs one job trains: a single run, or (``sweep --cohort``, ``grouped``) the student runs that share a
    data stream and a teacher (engine/cohort.py), trained in one process."""
    specs: List[RunSpec]
    grouped: bool = False

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.specs]

    @property
    def id(self) -> str:
        return cohort_id(self.names)

    def record(self) -> Optional[Dict[str, Any]]:
        """The ``cohort`` field of the job records: which runs trained together (None for a plain run's job)."""
        return {"id": self.id, "runs": self.names} if self.grouped else None

    def describe(self) -> str:
        """One line for the dry run: the shared student, seed and teacher, and each member's method."""
        from hkdbench.methods import get_method

        cfg = self.specs[0].cfg
        teacher = next((s.cfg.teacher.name for s in self.specs
                        if s.cfg.teacher and get_method(s.cfg.method).uses_teacher), "-")
        return (f"cohort {self.id}: {cfg.student.name} seed {cfg.train.seed}, teacher {teacher}: "
                f"{', '.join(s.cfg.method for s in self.specs)} ({len(self.specs)} runs)")


def cohort_id(names: Sequence[str]) -> str:
    """A short id of a set of runs (the same members give the same id in every record)."""
    return "c" + hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:8]


def make_cohorts(specs: Sequence[RunSpec], grouped: bool) -> List[Cohort]:
    """The jobs of ``specs``: one per run, or with ``grouped`` one per cohort of engine/cohort.py's
    :func:`group_cohorts` (teacher runs stay alone), in the runs' order."""
    if not grouped:
        return [Cohort([s]) for s in specs]
    from hkdbench.benchmark.engine.cohort import group_cohorts

    by_name = {s.name: s for s in specs}
    return [Cohort([by_name[c.run_name()] for c in group], grouped=True)
            for group in group_cohorts([s.cfg for s in specs])]
