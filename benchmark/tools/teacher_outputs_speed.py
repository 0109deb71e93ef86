"""Stored teacher outputs against cohorts and separate runs: one teacher, several students, a cell's methods each.

The plan (teacher -> each student, each method) is trained three ways per repeat, each in a fresh run store, in an
order that rotates from repeat to repeat; each way's time over the separate runs' is taken per repeat and the
medians reported (on a shared machine absolute times drift, ratios taken side by side much less):

* ``separate``: every run alone (``train``): one teacher pass per step per run that uses the teacher;
* ``cohorts``: one cohort per student (``train_cohort``): one teacher pass per step per student;
* ``stored``: ``train.teacher_outputs=stored``, the outputs computed first (``compute_teacher_outputs``, timed on
  its own as ``outputs_s``: once per data stream, which the students at one crop share), then one cohort per
  student that reads them. A cohort holding a method that reads the teacher's stages (FitNet) or its own pass (PAT)
  runs the teacher live, so with the ``cifar100-ofa`` methods the stored way saves only the outputs' students'
  passes that no cohort makes anyway.

Where the time goes: the teacher's forward on one batch (T, as ``cohort_speed`` times it) and the teacher passes
each way makes, so that T x passes is the teacher's share of each way's time. The teacher is the model with random
weights saved once to a checkpoint (no teacher run is timed; cost does not depend on the weights).

    python -m hkdbench.benchmark.tools.teacher_outputs_speed --teacher swin_tiny \\
        --students resnet18 mobilenetv2_100 deit_tiny --steps 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hkdbench.benchmark.tools.cohort_speed import (OFA_METHODS, _train_as_cohort, _train_separately, pair_setting,
                                                   run_configs, save_random_teacher, teacher_forward_ms)

WAYS = ("separate", "cohorts", "stored")
STORED = ["train.teacher_outputs=stored"]


def plan_configs(teacher: str, students: Sequence[str], methods: Sequence[str], steps: int, work: Path,
                 batch_size: Optional[int], extra: Sequence[str] = ()) -> List[list]:
    """Per student, one config per method (``cohort_speed.run_configs``: one epoch of ``steps`` batches)."""
    plans = []
    for student in students:
        setting = pair_setting(teacher, student, batch_size)
        checkpoint = save_random_teacher(setting, work)
        plans.append(run_configs(setting, checkpoint, methods, steps, extra=extra))
    return plans


def _stored(plans, runs_dir: str, device: str) -> float:
    """Trains the plan the stored way; returns the seconds its outputs took."""
    from hkdbench.benchmark.engine.cohort import cohort_reads_stored
    from hkdbench.benchmark.engine.trainer import compute_teacher_outputs

    tic = time.perf_counter()
    for cfgs in plans:
        if cohort_reads_stored(cfgs):  # as a sweep's teacher job: only for cohorts that read them
            compute_teacher_outputs(cfgs, runs_dir, device, echo=False)
    outputs_s = time.perf_counter() - tic
    for cfgs in plans:
        _train_as_cohort(cfgs, runs_dir, device)
    return outputs_s


def time_way(way: str, plans: Dict[str, list], work: Path, device: str, result: Dict[str, List[float]]) -> None:
    runs_dir = work / f"runs_{way}"
    tic = time.perf_counter()
    if way == "stored":
        result["outputs_s"].append(_stored(plans["stored"], str(runs_dir), device))
    for cfgs in plans["live"] if way != "stored" else []:
        (_train_separately if way == "separate" else _train_as_cohort)(cfgs, str(runs_dir), device)
    result[way].append(time.perf_counter() - tic)
    shutil.rmtree(runs_dir, ignore_errors=True)


def teacher_passes(plans: Dict[str, list]) -> Dict[str, int]:
    """Teacher passes per training step each way makes (the outputs' pass counted once per data stream)."""
    from hkdbench.methods import get_method

    from hkdbench.benchmark.engine.cohort import cohort_reads_stored
    from hkdbench.benchmark.engine.teacher_outputs import stream_identity

    users = [[c for c in cfgs if get_method(c.method).uses_teacher] for cfgs in plans["live"]]
    stored_cohorts = [cfgs for cfgs in plans["stored"] if cohort_reads_stored(cfgs)]
    streams = {json.dumps(stream_identity(cfgs[0]), sort_keys=True) for cfgs in stored_cohorts}
    live_cohorts = sum(1 for cfgs, u in zip(plans["stored"], users) if u and cfgs not in stored_cohorts)
    return {"separate": sum(len(u) for u in users), "cohorts": sum(1 for u in users if u),
            "stored": len(streams) + live_cohorts}


def summary(times: Dict[str, List[float]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {f"{w}_s": times[w] for w in WAYS}
    out["outputs_s"] = times["outputs_s"]
    for way in ("cohorts", "stored"):
        out[f"{way}_over_separate"] = statistics.median(a / b for a, b in zip(times[way], times["separate"]))
    out.update({f"{w}_s_median": statistics.median(times[w]) for w in WAYS})
    return out


def measure(teacher: str, students: Sequence[str], methods: Sequence[str], steps: int, repeats: int, work: Path,
            device: Optional[str], batch_size: Optional[int]) -> Dict[str, Any]:
    from hkdbench.benchmark.engine.evaluation import autocast_dtype, select_device, use_channels_last

    dev = select_device(device)
    plans = {"live": plan_configs(teacher, students, methods, steps, work, batch_size),
             "stored": plan_configs(teacher, students, methods, steps, work, batch_size, STORED)}
    warm = {"live": plan_configs(teacher, students[:1], methods, 1, work, batch_size), "stored": []}
    time_way("cohorts", warm, work, str(dev), {"cohorts": []})  # untimed: lazy imports, allocator pools
    times: Dict[str, List[float]] = {w: [] for w in (*WAYS, "outputs_s")}
    for r in range(repeats):
        for way in WAYS[r % 3:] + WAYS[:r % 3]:
            time_way(way, plans, work, str(dev), times)
    first = plans["live"][0][0]
    setting = pair_setting(teacher, students[0], batch_size)
    dtype = autocast_dtype(first.train.precision, dev)
    forward_ms = teacher_forward_ms(setting, dev, dtype, use_channels_last(first.train.channels_last, dev))
    passes = teacher_passes(plans)
    result = {"teacher": teacher, "students": list(students), "methods": list(methods), "steps": steps,
              "repeats": repeats, "img_size": setting.img_size, "batch_size": setting.batch_size, "device": str(dev),
              "teacher_forward_ms": forward_ms, "teacher_passes_per_step": passes, **summary(times)}
    result["teacher_share"] = {w: forward_ms / 1000 * steps * passes[w] / result[f"{w}_s_median"] for w in WAYS}
    return result


def format_result(r: Dict[str, Any]) -> str:
    lines = [f"{r['teacher']} -> {', '.join(r['students'])}: {', '.join(r['methods'])}; {r['img_size']} px, batch "
             f"{r['batch_size']}, {r['steps']} steps, {r['repeats']} repeats, {r['device']}; teacher forward "
             f"{r['teacher_forward_ms']:.0f} ms a batch",
             "| way | median s | / separate | teacher passes a step | teacher share |", "|---|---:|---:|---:|---:|"]
    for way in WAYS:
        ratio = 1.0 if way == "separate" else r[f"{way}_over_separate"]
        lines.append(f"| {way} | {r[f'{way}_s_median']:.1f} | {ratio:.2f}x | {r['teacher_passes_per_step'][way]} | "
                     f"{r['teacher_share'][way]:.0%} |")
    lines.append(f"(stored: the outputs took {statistics.median(r['outputs_s']):.1f} s of it)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hkdbench.benchmark.tools.teacher_outputs_speed",
                                description="time a teacher's students trained separately, in cohorts and from "
                                            "stored teacher outputs")
    p.add_argument("--teacher", default="swin_tiny")
    p.add_argument("--students", nargs="+", default=["resnet18", "mobilenetv2_100", "deit_tiny"])
    p.add_argument("--methods", nargs="+", default=list(OFA_METHODS))
    p.add_argument("--steps", type=int, default=2, help="train steps per run (one epoch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: cohort_speed's by input size")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, metavar="OUT")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        print("teacher_outputs_speed: --steps and --repeats must be >= 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="teacher_outputs_speed_"))
    try:
        result = measure(args.teacher, args.students, args.methods, args.steps, args.repeats, work, args.device,
                         args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
