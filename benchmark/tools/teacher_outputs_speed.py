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
weights saved once to a checkpoint (no teacher run is timed; cost does not depend on the weights). Each separate
run is also timed alone, so that a student's ``kd`` run less its ``none`` run is what the teacher costs a run
(building, loading and running it). The cohorts' time less that cost once per student is the floor of any way
that shares the teacher: cohorts whose teacher costs nothing, as stored outputs computed by an earlier sweep.

Under a time limit (``measure``'s deadline, as the GPU check gives it) a further repeat starts only when it will end
in time. ``LOGIT_READERS`` are methods that can all read stored outputs: the plan where stored beats cohorts.

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
from typing import Any, Callable, Dict, List, Optional, Sequence

from hkdbench.benchmark.tools.cohort_speed import (MARGIN, OFA_METHODS, _train_as_cohort, _train_separately,
                                                   pair_setting, run_configs, save_random_teacher,
                                                   teacher_forward_ms)

WAYS = ("separate", "cohorts", "stored")
# the methods that can all read stored outputs (teacher_reads LOGITS or PRE_LOGITS): where stored beats cohorts
LOGIT_READERS = ("kd", "dkd", "dist", "ofa", "crd")
STORED = ["train.teacher_outputs=stored"]


def plan_configs(teacher: str, students: Sequence[str], methods: Sequence[str], steps: int, work: Path,
                 batch_size: Optional[int], extra: Sequence[str] = (), data_root: Optional[str] = None) -> List[list]:
    """Per student, one config per method (``cohort_speed.run_configs``: one epoch of ``steps`` batches)."""
    plans = []
    for student in students:
        setting = pair_setting(teacher, student, batch_size)
        checkpoint = save_random_teacher(setting, work)
        plans.append(run_configs(setting, checkpoint, methods, steps, data_root, extra=extra))
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


def _separately_timed(cfgs, runs_dir: str, device: str, run_s: Dict[str, float]) -> None:
    """Trains each run alone, as ``_train_separately``, keeping each one's seconds under ``student/method``."""
    for cfg in cfgs:
        tic = time.perf_counter()
        _train_separately([cfg], runs_dir, device)
        run_s[f"{cfg.student.name}/{cfg.method}"] = time.perf_counter() - tic


def time_way(way: str, plans: Dict[str, list], work: Path, device: str, result: Dict[str, list]) -> None:
    runs_dir = work / f"runs_{way}"
    tic = time.perf_counter()
    if way == "stored":
        result["outputs_s"].append(_stored(plans["stored"], str(runs_dir), device))
    elif way == "separate":
        run_s: Dict[str, float] = {}
        for cfgs in plans["live"]:
            _separately_timed(cfgs, str(runs_dir), device, run_s)
        result["run_s"].append(run_s)
    else:
        for cfgs in plans["live"]:
            _train_as_cohort(cfgs, str(runs_dir), device)
    result[way].append(time.perf_counter() - tic)
    shutil.rmtree(runs_dir, ignore_errors=True)


def teacher_cost_s(run_s: Dict[str, float]) -> Optional[float]:
    """What the teacher costs one run of each student, summed over the students: its ``kd`` run's seconds less its
    ``none`` run's (building, loading and running the teacher; the KD loss itself is negligible; a ``kd`` run that
    happened to be faster costs 0). None where the plan lacks ``none`` or ``kd``."""
    students = {key.split("/")[0] for key in run_s}
    if not all(f"{s}/{m}" in run_s for s in students for m in ("none", "kd")):
        return None
    return sum(max(0.0, run_s[f"{s}/kd"] - run_s[f"{s}/none"]) for s in students)


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


def summary(times: Dict[str, list]) -> Dict[str, Any]:
    out: Dict[str, Any] = {f"{w}_s": times[w] for w in WAYS}
    out.update(outputs_s=times["outputs_s"], run_s=times["run_s"])
    for way in ("cohorts", "stored"):
        out[f"{way}_over_separate"] = statistics.median(a / b for a, b in zip(times[way], times["separate"]))
    out.update({f"{w}_s_median": statistics.median(times[w]) for w in WAYS})
    costs = [teacher_cost_s(run_s) for run_s in times["run_s"]]
    if costs and None not in costs:  # per repeat, over that repeat's separate runs, as the ways' ratios
        out["no_teacher_floor_s"] = [c - t for c, t in zip(times["cohorts"], costs)]
        out["floor_over_separate"] = statistics.median(f / s for f, s in zip(out["no_teacher_floor_s"],
                                                                              times["separate"]))
    return out


def measure(teacher: str, students: Sequence[str], methods: Sequence[str], steps: int, repeats: int, work: Path,
            device: Optional[str], batch_size: Optional[int], data_root: Optional[str] = None,
            deadline: Optional[float] = None,
            on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The three ways timed side by side: the untimed warm-up, one repeat, the teacher's forward, then the other
    repeats while one more fits before ``deadline`` (``time.time()``; None: all of them), as ``cohort_speed``'s
    ``measure_pair`` under the GPU check; ``on_progress`` gets the result after the warm-up (``repeats_done`` 0:
    the passes and ``warmup_s``, one cohort's single step) and after each repeat."""
    from hkdbench.benchmark.engine.evaluation import select_device

    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    dev = str(select_device(device))
    plans = {"live": plan_configs(teacher, students, methods, steps, work, batch_size, data_root=data_root),
             "stored": plan_configs(teacher, students, methods, steps, work, batch_size, STORED, data_root)}
    warm = {"live": plan_configs(teacher, students[:1], methods, 1, work, batch_size, data_root=data_root),
            "stored": []}
    tic = time.perf_counter()
    time_way("cohorts", warm, work, dev, {"cohorts": []})  # untimed: lazy imports, allocator pools
    setting = pair_setting(teacher, students[0], batch_size)
    result: Dict[str, Any] = {"teacher": teacher, "students": list(students), "methods": list(methods),
                              "steps": steps, "repeats": repeats, "repeats_done": 0, "img_size": setting.img_size,
                              "batch_size": setting.batch_size, "device": dev,
                              "teacher_passes_per_step": teacher_passes(plans),
                              "warmup_s": time.perf_counter() - tic}
    report = on_progress or (lambda result: None)
    report(result)  # the plan and the warm-up's cost, kept where not one repeat fits
    times: Dict[str, list] = {w: [] for w in (*WAYS, "outputs_s", "run_s")}
    longest = 0.0
    for r in range(repeats):
        if r and deadline is not None and time.time() + MARGIN * longest > deadline:
            break  # another repeat would not end in time: what is measured stays whole
        tic = time.perf_counter()
        for way in WAYS[r % 3:] + WAYS[:r % 3]:
            time_way(way, plans, work, dev, times)
        longest = max(longest, time.perf_counter() - tic)
        if r == 0:
            result["teacher_forward_ms"] = _teacher_forward_ms(setting, plans["live"][0][0], dev)
        result.update(summary(times), repeats_done=r + 1)
        result["teacher_share"] = {w: result["teacher_forward_ms"] / 1000 * steps
                                   * result["teacher_passes_per_step"][w] / result[f"{w}_s_median"] for w in WAYS}
        report(result)
    return result


def _teacher_forward_ms(setting, cfg, device: str) -> float:
    """The teacher's forward on one batch in the runs' precision and memory format (``cohort_speed``'s timing)."""
    import torch

    from hkdbench.benchmark.engine.evaluation import autocast_dtype, use_channels_last

    dev = torch.device(device)
    return teacher_forward_ms(setting, dev, autocast_dtype(cfg.train.precision, dev),
                              use_channels_last(cfg.train.channels_last, dev))


def format_result(r: Dict[str, Any]) -> str:
    lines = [f"{r['teacher']} -> {', '.join(r['students'])}: {', '.join(r['methods'])}; {r['img_size']} px, batch "
             f"{r['batch_size']}, {r['steps']} steps, {r['repeats_done']} of {r['repeats']} repeats, {r['device']}; "
             f"teacher forward {r['teacher_forward_ms']:.0f} ms a batch",
             "| way | median s | / separate | teacher passes a step | teacher share |", "|---|---:|---:|---:|---:|"]
    for way in WAYS:
        ratio = 1.0 if way == "separate" else r[f"{way}_over_separate"]
        lines.append(f"| {way} | {r[f'{way}_s_median']:.1f} | {ratio:.2f}x | {r['teacher_passes_per_step'][way]} | "
                     f"{r['teacher_share'][way]:.0%} |")
    lines.append(f"(stored: the outputs took {statistics.median(r['outputs_s']):.1f} s of it)")
    if "floor_over_separate" in r:
        lines.append(f"no-teacher floor: {statistics.median(r['no_teacher_floor_s']):.1f} s, "
                     f"{r['floor_over_separate']:.2f}x the separate runs (the cohorts less what their teacher costs "
                     f"them: every run's own student work, the data shared)")
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
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: the dataset's own lookup)")
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
                         args.batch_size, args.data_root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
