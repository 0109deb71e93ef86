"""Cohort against separate runs: what training a cell's methods together saves, measured as a time ratio.

For each teacher -> student pair, the five ``cifar100-ofa`` methods (none, kd, dkd, fitnet, ofa) are trained for
one short epoch on Fashion-MNIST, in one process, twice per repeat: as one cohort (``train_cohort``) and as five
separate runs (``train`` each), in alternating order (cohort first on even repeats), each in a fresh run store.
The ratio cohort / separate is taken per repeat and its median reported: on a shared machine absolute times drift,
ratios taken side by side much less. Every method first trains one untimed step, which pays the one-time costs
(lazy imports, allocator pools, kernel caches). Under a time limit (``measure_pair``'s deadline, as the GPU check
gives it) the parts below are measured right after the first repeat, and a further repeat starts only when it
will end in time.

The teacher is the pair's model with random weights saved once to a checkpoint file (``--teacher-checkpoint``):
a teacher used as it is, so no teacher training is timed (cost does not depend on the weights).

Where the time goes: the teacher's forward pass per batch (T, timed alone, without gradients) and each method's
full train step (``hkdbench overhead``'s ``measure_method``: T + the student's step S_i for a method that uses the
teacher). Per step, a cohort that shares the teacher pass costs T + sum S_i and separate runs sum (T + S_i); that
ratio is the expected one; the rest of the measured time (building models, the data pipeline, evaluation,
checkpoints) is reported as "other".

    python -m hkdbench.benchmark.tools.cohort_speed --pairs demo "swin_tiny->resnet18" --steps 8 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

OFA_METHODS = ("none", "kd", "dkd", "fitnet", "ofa")
DATASET, NUM_CLASSES, IN_CHANS = "fashion-mnist", 10, 1
# batch size by input size: the demo's models at 32 px, the papers' at 224 px (small: minutes on a CPU)
DEFAULT_BATCH = {32: 64, 224: 8}


def compile_available() -> bool:
    """Whether this version of the trainer has the ``train.compile`` setting."""
    from hkdbench.benchmark.core.config import TrainConfig

    return "compile" in {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class PairSetting:
    """One pair's measurement: the models, the input size, the batch and the recipe the student's runs use."""
    teacher: str
    student: str
    img_size: int
    batch_size: int
    recipe: str


def parse_pairs(items: Sequence[str]) -> List[Tuple[str, str]]:
    """``T->S`` items, or ``demo`` (the pair of ``hkdbench demo``) and ``demo-preset`` (the demo preset's six)."""
    from hkdbench.benchmark.engine import demo
    from hkdbench.benchmark.models.zoo import zoo_entry
    from hkdbench.benchmark.sweep.preset import load_preset

    pairs: List[Tuple[str, str]] = []
    for item in items:
        if item == "demo":
            pairs.append((demo.TEACHER, demo.STUDENT))
        elif item == "demo-preset":
            pairs.extend(load_preset("demo").pair_list())
        elif "->" in item:
            teacher, student = (part.strip() for part in item.split("->", 1))
            zoo_entry(teacher), zoo_entry(student)  # an unknown model fails here with the known ones
            pairs.append((teacher, student))
        else:
            raise ValueError(f"a pair is TEACHER->STUDENT (e.g. swin_tiny->resnet18), 'demo' or 'demo-preset'; "
                             f"got {item!r}")
    return pairs


def pair_setting(teacher: str, student: str, batch_size: Optional[int] = None) -> PairSetting:
    """The models' own input size (the larger of the two); the demo recipe at 32 px, else the papers' CIFAR
    recipe for the student's family (as ``--recipe auto`` picks it on CIFAR-100), on Fashion-MNIST."""
    from hkdbench.benchmark.models.zoo import zoo_entry
    from hkdbench.benchmark.recipes.resolve import AUTO_RECIPES

    size = max(zoo_entry(teacher).img_size, zoo_entry(student).img_size)
    family = "cnn" if zoo_entry(student).family == "cnn" else "other"
    recipe = "demo" if size <= 64 else AUTO_RECIPES["cifar100"][family]
    batch = batch_size or DEFAULT_BATCH.get(size, 8)
    if batch < 1:
        raise ValueError(f"the batch size must be >= 1, got {batch}")
    return PairSetting(teacher, student, size, batch, recipe)


def save_random_teacher(setting: PairSetting, folder: Path, seed: int = 0) -> Path:
    """The teacher with random weights as a checkpoint file: the runs use it as it is (no teacher run)."""
    import torch

    from hkdbench.benchmark.engine.seeding import seed_everything
    from hkdbench.benchmark.models.zoo import create_model

    seed_everything(seed)
    model = create_model(setting.teacher, NUM_CLASSES, in_chans=IN_CHANS, img_size=setting.img_size)
    path = folder / f"teacher_{setting.teacher}_{setting.img_size}px.pt"
    torch.save(model.model.state_dict(), path)
    return path


def run_configs(setting: PairSetting, teacher_checkpoint: Path, methods: Sequence[str], steps: int,
                data_root: Optional[str] = None, compile_step: bool = False, extra: Sequence[str] = ()):
    """One config per method: one epoch of ``steps`` batches, a one-batch evaluation, no progress lines."""
    from hkdbench.benchmark.recipes.resolve import resolve_run_config

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    items = [f"data.img_size={setting.img_size}", f"data.batch_size={setting.batch_size}",
             f"data.train_subset={steps * setting.batch_size}", f"data.eval_subset={setting.batch_size}",
             f"data.eval_batch_size={setting.batch_size}", "train.epochs=1", "train.log_interval=0"]
    if data_root:
        items.append(f"data.root={data_root}")
    if compile_step:
        if not compile_available():
            raise RuntimeError("train.compile not available in this version of the trainer")
        items.append("train.compile=true")
    return [resolve_run_config(kind="student", student=setting.student, teacher=setting.teacher, method=m,
                               dataset=DATASET, recipe=setting.recipe, teacher_checkpoint=str(teacher_checkpoint),
                               overrides=[*items, *extra]) for m in methods]


# --------------------------------------------------------------------------------------------------------------
# Timing the two ways of training
# --------------------------------------------------------------------------------------------------------------

def _train_separately(cfgs, runs_dir: str, device: Optional[str]) -> None:
    from hkdbench.benchmark.engine.trainer import train

    for cfg in cfgs:
        result = train(cfg, runs_dir=runs_dir, device=device, progress=False, echo=False)
        if result.status != "done":
            raise RuntimeError(f"{result.run_dir.path.name} ended {result.status}")


def _train_as_cohort(cfgs, runs_dir: str, device: Optional[str]) -> None:
    from hkdbench.benchmark.engine.trainer import train_cohort

    for result in train_cohort(cfgs, runs_dir=runs_dir, device=device, progress=False, echo=False):
        if result.status != "done":
            raise RuntimeError(f"{result.run_dir.path.name} ended {result.status} in the cohort")


WAYS = {"cohort": _train_as_cohort, "separate": _train_separately}


def _timed(way: str, cfgs, work: Path, tag: str, device: Optional[str]) -> float:
    """Seconds to train ``cfgs`` one way, in a fresh run store (removed afterwards: every run trains anew)."""
    runs_dir = work / tag
    tic = time.perf_counter()
    WAYS[way](cfgs, str(runs_dir), device)
    seconds = time.perf_counter() - tic
    shutil.rmtree(runs_dir, ignore_errors=True)
    return seconds


def time_one_repeat(r: int, cfgs, work: Path, device: Optional[str], times: Dict[str, List[float]]) -> float:
    """Repeat ``r``: both ways, cohort first on even repeats; their times appended to ``times``; its seconds."""
    tic = time.perf_counter()
    for way in (("cohort", "separate") if r % 2 == 0 else ("separate", "cohort")):
        times[way].append(_timed(way, cfgs, work, f"r{r}_{way}", device))
    return time.perf_counter() - tic


def timing_summary(times: Dict[str, List[float]]) -> Dict[str, Any]:
    ratios = [c / s for c, s in zip(times["cohort"], times["separate"])]
    return {"cohort_s": times["cohort"], "separate_s": times["separate"], "ratios": ratios,
            "ratio": statistics.median(ratios), "cohort_s_median": statistics.median(times["cohort"]),
            "separate_s_median": statistics.median(times["separate"])}


# --------------------------------------------------------------------------------------------------------------
# Where the time goes
# --------------------------------------------------------------------------------------------------------------

def _precision_name(dtype) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def teacher_forward_ms(setting: PairSetting, device, dtype, channels_last: bool, repeats: int = 3) -> float:
    """Median time of the teacher's forward pass on one batch, without gradients, as the trainer runs it."""
    import torch

    from hkdbench.benchmark.engine.evaluation import _autocast
    from hkdbench.benchmark.tools.overhead import _sync
    from hkdbench.benchmark.models.zoo import create_model

    teacher = create_model(setting.teacher, NUM_CLASSES, in_chans=IN_CHANS, img_size=setting.img_size).to(device)
    teacher.eval()
    images = torch.randn(setting.batch_size, IN_CHANS, setting.img_size, setting.img_size, device=device)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.no_grad(), _autocast(device, dtype):
        for i in range(repeats + 1):  # the first is untimed
            _sync(device)
            tic = time.perf_counter()
            teacher(images)
            _sync(device)
            if i:
                times.append(time.perf_counter() - tic)
    return 1000 * statistics.median(times)


def step_parts(setting: PairSetting, cfgs, device, repeats: int = 3) -> Dict[str, Any]:
    """T (the teacher's forward) and each method's full train step (overhead's measure_method), and the ratio a
    cohort sharing the teacher pass would reach on the steps alone: (T + sum S_i) / sum (T + S_i)."""
    from hkdbench.methods import get_method

    from hkdbench.benchmark.engine.evaluation import autocast_dtype, use_channels_last
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.tools.overhead import measure_method

    dtype = autocast_dtype(cfgs[0].train.precision, device)
    channels_last = use_channels_last(cfgs[0].train.channels_last, device)
    teacher_ms = teacher_forward_ms(setting, device, dtype, channels_last, repeats)
    step_ms: Dict[str, float] = {}
    for cfg in cfgs:
        oc = OverheadConfig(teacher=setting.teacher, student=setting.student, method=cfg.method,
                            batch_size=setting.batch_size, img_size=setting.img_size, num_classes=NUM_CLASSES,
                            in_chans=IN_CHANS, warmup=1, repeats=repeats, precision=_precision_name(dtype),
                            optimizer=cfg.optim.name, device=str(device))
        step_ms[cfg.method] = measure_method(oc)["step_time_ms"]
    with_teacher = [m for m in step_ms if get_method(m).uses_teacher]
    student_ms = {m: t - (teacher_ms if m in with_teacher else 0.0) for m, t in step_ms.items()}
    separate = sum(step_ms.values())
    shared = (teacher_ms if with_teacher else 0.0) + sum(student_ms.values())
    return {"teacher_forward_ms": teacher_ms, "step_ms": step_ms, "student_step_ms": student_ms,
            "methods_with_teacher": with_teacher, "expected_step_ratio": shared / separate,
            "teacher_share_of_separate_steps": teacher_ms * len(with_teacher) / separate,
            # the goal holds where the teacher's forward costs at least the student's step (None: no 'none')
            "teacher_over_student_none": teacher_ms / student_ms["none"] if "none" in student_ms else None}


def time_shares(parts: Dict[str, Any], timing: Dict[str, Any], steps: int) -> Dict[str, float]:
    """The measured medians split into teacher forwards, student steps and the rest (setup, data, evaluation,
    checkpoints), as shares of each way's time; the cohort's teacher time counted once per step (the shared
    pass it is designed to take)."""
    teacher_s = parts["teacher_forward_ms"] * steps / 1000
    student_s = sum(parts["student_step_ms"].values()) * steps / 1000
    separate, cohort = timing["separate_s_median"], timing["cohort_s_median"]
    n_teacher = len(parts["methods_with_teacher"])
    return {"separate_teacher": n_teacher * teacher_s / separate, "separate_student_steps": student_s / separate,
            "separate_other": 1 - (n_teacher * teacher_s + student_s) / separate,
            "cohort_teacher_if_shared": (teacher_s if n_teacher else 0.0) / cohort,
            "cohort_student_steps": student_s / cohort,
            "cohort_other": 1 - ((teacher_s if n_teacher else 0.0) + student_s) / cohort}


def measure_pair(setting: PairSetting, methods: Sequence[str], steps: int, repeats: int, work: Path,
                 device: Optional[str] = None, data_root: Optional[str] = None, part_repeats: int = 3,
                 compile_step: bool = False, deadline: Optional[float] = None,
                 on_progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """The cohort/separate timing of one pair, and (``part_repeats`` > 0: timed steps per part) where its step
    time goes. Measured in the order that keeps the most under a time limit: the untimed warm-up, one repeat,
    the parts, then the other repeats while one more fits before ``deadline`` (``time.time()``; None: all of
    them); ``on_progress`` gets the result as it grows (``repeats_done`` says how far it got)."""
    from hkdbench.benchmark.engine.evaluation import select_device

    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    report = on_progress or (lambda result: None)
    dev = select_device(device)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = save_random_teacher(setting, work)
    cfgs = run_configs(setting, checkpoint, methods, steps, data_root, compile_step)
    warmup_cfgs = run_configs(setting, checkpoint, methods, 1, data_root, compile_step)
    result: Dict[str, Any] = {**dataclasses.asdict(setting), "methods": list(methods), "steps": steps,
                              "repeats": repeats, "repeats_done": 0, "device": str(dev), "compile": compile_step,
                              "precision": cfgs[0].train.precision}
    _timed("separate", warmup_cfgs, work, "warmup", str(dev))
    times: Dict[str, List[float]] = {"cohort": [], "separate": []}
    longest = 0.0
    for r in range(repeats):
        if r and deadline is not None and time.time() + MARGIN * longest > deadline:
            break  # another repeat would not end in time: what is measured stays whole
        longest = max(longest, time_one_repeat(r, cfgs, work, str(dev), times))
        result.update(timing_summary(times), repeats_done=r + 1)
        if r == 0 and part_repeats > 0:
            result["parts"] = step_parts(setting, cfgs, dev, part_repeats)
        if "parts" in result:
            result["shares"] = time_shares(result["parts"], result, steps)
        report(result)
    return result


# a repeat is started only when this many times the longest one so far still ends before the deadline
MARGIN = 1.2


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def format_results(results: List[Dict[str, Any]]) -> str:
    lines = ["| pair | px | batch | steps | cohort s | separate s | cohort/separate | expected (steps) | "
             "teacher fwd / student step (none) | teacher share (separate) | other (separate / cohort) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        p, sh = r.get("parts"), r.get("shares")
        expected = f"{p['expected_step_ratio']:.2f}x" if p else "-"
        t_over_s = f"{p['teacher_over_student_none']:.2f}" if p and p["teacher_over_student_none"] else "-"
        teacher = f"{sh['separate_teacher']:.0%}" if sh else "-"
        other = f"{sh['separate_other']:.0%} / {sh['cohort_other']:.0%}" if sh else "-"
        lines.append(f"| {r['teacher']} -> {r['student']} | {r['img_size']} | {r['batch_size']} | {r['steps']} | "
                     f"{r['cohort_s_median']:.1f} | {r['separate_s_median']:.1f} | {r['ratio']:.2f}x | {expected} | "
                     f"{t_over_s} | {teacher} | {other} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hkdbench.benchmark.tools.cohort_speed",
                                description="time a cell's methods trained as one cohort against separate runs")
    p.add_argument("--pairs", nargs="+", default=["demo", "swin_tiny->resnet18"],
                   help="TEACHER->STUDENT, 'demo' (resnet_mini->vit_mini) or 'demo-preset' (its six pairs)")
    p.add_argument("--methods", nargs="+", default=list(OFA_METHODS))
    p.add_argument("--steps", type=int, default=8, help="train steps per run (one epoch)")
    p.add_argument("--repeats", type=int, default=3, help="cohort/separate pairs of timings (the median is reported)")
    p.add_argument("--batch-size", type=int, default=None, help=f"default by input size: {DEFAULT_BATCH}")
    p.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: the dataset's own lookup)")
    p.add_argument("--compile", action="store_true", help="train.compile=true for every run")
    p.add_argument("--part-repeats", type=int, default=3,
                   help="timed steps per part of the step (teacher forward, each method's step); 0: skip them")
    p.add_argument("--work", default=None, help="scratch folder for the runs (default: a temporary one)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from hkdbench.methods import get_method

    args = build_parser().parse_args(argv)
    try:
        pairs = parse_pairs(args.pairs)
        for m in args.methods:
            get_method(m)
        settings = [pair_setting(t, s, args.batch_size) for t, s in pairs]
        if args.compile and not compile_available():
            raise RuntimeError("train.compile not available in this version of the trainer")
        if args.steps < 1 or args.repeats < 1:
            raise ValueError("--steps and --repeats must be >= 1")
    except (ValueError, KeyError, RuntimeError) as err:
        print(f"cohort_speed: {err}", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cohort_speed_"))
    results = []
    try:
        for setting in settings:
            print(f"{setting.teacher} -> {setting.student}: {setting.img_size} px, batch {setting.batch_size}, "
                  f"{args.steps} steps, {len(args.methods)} methods, {args.repeats} repeats", flush=True)
            results.append(measure_pair(setting, args.methods, args.steps, args.repeats,
                                        work / f"{setting.teacher}_{setting.student}", args.device,
                                        args.data_root, part_repeats=args.part_repeats,
                                        compile_step=args.compile))
            r = results[-1]
            print(f"  cohort {r['cohort_s_median']:.1f} s, separate {r['separate_s_median']:.1f} s, "
                  f"ratio {r['ratio']:.2f}x (per repeat: {', '.join(f'{x:.2f}' for x in r['ratios'])})", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_results(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        import torch

        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
