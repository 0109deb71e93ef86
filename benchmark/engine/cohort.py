"""Cohorts: runs that share a data stream train together in one process.

Runs share a stream when they train the same student on the same data settings, seed, ranks, precision and memory
format (:func:`stream_key`): each step draws one batch for all of them. Members that also share a teacher
(:func:`teacher_key`) share its plain forward pass; a run without a teacher (``none``, or a method that uses
none) joins the first cohort of its stream. Every member writes its own run directory, exactly as alone.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence

from hkdbench.benchmark.core.config import ConfigError, RunConfig


def stream_key(cfg: RunConfig) -> str:
    """What fixes a run's batches: the student (its input size and crop), the data settings, the seed, the
    ranks the global batch is spread over (each its own slice and draws), the label smoothing that mixup folds
    into its targets, and the precision and memory format of the shared teacher pass."""
    body: Dict[str, Any] = {"student": cfg.student.name, "data": cfg.data, "seed": cfg.train.seed,
                            "world": cfg.train.world,
                            "label_smoothing": cfg.optim.label_smoothing, "precision": cfg.train.precision,
                            "channels_last": cfg.train.channels_last}
    return json.dumps(_plain(body), sort_keys=True, default=str)


def reads_stored(cfg: RunConfig) -> bool:
    """Whether the run reads stored teacher outputs (engine/teacher_outputs.py): ``train.teacher_outputs=stored``, a
    method that reads only the teacher's logits or pre-logits, and no CKA probe (it probes the teacher's stages)."""
    from hkdbench.methods import LOGITS, PRE_LOGITS, get_method

    method = get_method(cfg.method)
    return (cfg.train.teacher_outputs == "stored" and cfg.kind != "teacher" and cfg.teacher is not None
            and method.uses_teacher and method.teacher_reads in (LOGITS, PRE_LOGITS) and not cfg.train.probe_every)


def cohort_reads_stored(cfgs: Sequence[RunConfig]) -> bool:
    """Whether a cohort reads stored teacher outputs: every member that uses a teacher reads them."""
    users = [c for c in cfgs if teacher_key(c) is not None]
    return bool(users) and all(reads_stored(c) for c in users)


def teacher_key(cfg: RunConfig) -> Optional[str]:
    """Which teacher weights a run distils from (None: it uses no teacher)."""
    from hkdbench.methods import get_method

    if cfg.kind == "teacher" or cfg.teacher is None or not get_method(cfg.method).uses_teacher:
        return None
    t = cfg.teacher
    source = cfg.teacher_run or t.checkpoint or t.pretrained or "scratch"
    return json.dumps([t.name, source, t.weights, t.checkpoint_ema, t.pretrained_sha256])


def group_cohorts(cfgs: Sequence[RunConfig]) -> List[List[RunConfig]]:
    """The runs grouped into cohorts, in order of first appearance: one per (stream, teacher); a run without a
    teacher joins the first cohort of its stream (its own when there is none). Teacher runs never join one; a run
    listed twice (the student alone serves every teacher) is trained once. A cohort reads stored teacher outputs
    when all its teacher users can (:func:`cohort_reads_stored`); one that holds a method reading the teacher's
    stages runs it live, its stored readers sharing that pass (kept together: split, the teacher would run twice)."""
    unique: Dict[str, RunConfig] = {}
    for cfg in cfgs:
        unique.setdefault(cfg.run_name(), cfg)
    cfgs = list(unique.values())
    groups: Dict[str, List[RunConfig]] = {}
    first_of_stream: Dict[str, str] = {}
    alone: List[RunConfig] = []
    for cfg in cfgs:
        if cfg.kind == "teacher":
            alone.append(cfg)
            continue
        stream, teacher = stream_key(cfg), teacher_key(cfg)
        if teacher is not None:
            key = json.dumps([stream, teacher])
            first_of_stream.setdefault(stream, key)
            groups.setdefault(key, []).append(cfg)
    for cfg in cfgs:
        if cfg.kind != "teacher" and teacher_key(cfg) is None:
            stream = stream_key(cfg)
            key = first_of_stream.setdefault(stream, json.dumps([stream, None]))
            groups.setdefault(key, []).append(cfg)
    order = {id(c): i for i, c in enumerate(cfgs)}
    cohorts = [[c] for c in alone] + [sorted(g, key=lambda c: order[id(c)]) for g in groups.values()]
    return sorted(cohorts, key=lambda g: min(order[id(c)] for c in g))


def check_cohort(cfgs: Sequence[RunConfig]) -> None:
    """Raises ConfigError unless the runs can train as one cohort (one stream; at most one teacher)."""
    if not cfgs:
        raise ConfigError("a cohort needs at least one run")
    names = [c.run_name() for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"a cohort lists a run twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    if any(c.kind == "teacher" for c in cfgs) and len(cfgs) > 1:
        raise ConfigError("a teacher run trains alone, not in a cohort")
    streams = {stream_key(c) for c in cfgs}
    teachers = {teacher_key(c) for c in cfgs} - {None}
    if len(streams) > 1 or len(teachers) > 1:
        raise ConfigError("these runs cannot share one data stream and one teacher: a cohort's runs must have the "
                          "same student, data settings, seed, label smoothing, precision and channels_last, and "
                          f"the same teacher; got {len(streams)} streams and {len(teachers)} teachers for "
                          f"{', '.join(names)}")


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) else value


def probed_against(cfg: RunConfig, teacher_runs: Sequence[str]) -> RunConfig:
    """``cfg`` CKA-probed against ``teacher_runs`` (``train.probe_teachers``) when it is a probed student run with no
    teacher of its own (the student alone) that names none itself; else ``cfg`` unchanged."""
    import dataclasses

    if (teacher_runs and cfg.kind == "student" and teacher_key(cfg) is None and cfg.train.probe_every
            and not cfg.train.probe_teachers):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, probe_teachers=tuple(teacher_runs)))
    return cfg


def probing_the_cohorts_teacher(cfgs: Sequence[RunConfig]) -> List[RunConfig]:
    """``cfgs`` with the student alone probed against the teacher run(s) its cohort distils from (the best weights,
    as the probe loads them): :func:`probed_against`."""
    taught = sorted({c.teacher_run for c in cfgs if c.teacher_run and c.teacher.weights == "best"})
    return [probed_against(c, taught) for c in cfgs]
