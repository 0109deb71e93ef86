"""A preset expanded into runs: every (pair, method, seed) cell resolved to its run config, the distinct student
runs and the teacher runs they need (trained first)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


from hkdbench.benchmark.config import ConfigError, RunConfig, deep_merge, flatten
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
        names = sorted(r.name for r in self.runs)
        return hashlib.sha256("\n".join(names).encode()).hexdigest()[:10]

    def sweep_id(self) -> str:
        return f"{self.preset.name}-{self.digest()}"


def expand(p: Preset) -> SweepPlan:
    """Every (pair, method, seed) cell resolved to its run config; the distinct teacher runs they need."""
    from hkdbench.methods import get_method

    from hkdbench.benchmark.models.pretrained import warn_scratch_imagenet_teacher
    from hkdbench.benchmark.recipes import resolve_run_config, teacher_run_config

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
                    if cfg.teacher_recipe is not None and get_method(m).uses_teacher:  # the teacher is trained
                        t_cfg = teacher_run_config(cfg)
                        t_name = t_cfg.run_name()
                        if t_name not in teachers:
                            warn_scratch_imagenet_teacher(t_cfg)
                        teachers.setdefault(t_name, RunSpec(t_cfg, "teacher"))
                        teachers[t_name].cells.append(cell)
                        spec.teacher_run = t_name
                spec.cells.append(cell)
    return SweepPlan(p, cells, list(teachers.values()), list(students.values()))
