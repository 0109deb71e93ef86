"""The GPU check (``scripts/gpu-check.sh OUTDIR``): what one GPU does with this harness, in about 7 minutes.

Its parts, each in its own process with its own time budget, so that a crash, an out-of-memory or a timeout of
one part is recorded (status, error, the tail of its log) and the others still run:

* ``env``: versions, the GPU, whether ``train.compile`` exists in this version;
* ``overhead_eager_*``: ``hkdbench overhead``'s measurement (``measure_method``: the trainer's own step) at 224 px,
  batch 128, bf16 + channels_last, per method: images/s, step time, peak memory, FLOPs, with ratios to ``none``
  and ``kd``, for ``swin_tiny -> resnet18`` and ``convnext_tiny -> deit_tiny``;
* ``stream_*``: ``stream_speed``'s measurement of the ``cifar-vit`` data stream for one pair: images/s of the
  stream alone, of the KD step alone, of both serially and with the next batch drawn inside the step (before its
  host read); the host synchronisations of one batch (torch's sync debug mode on CUDA); a further repeat only where
  it fits;
* ``cohort_*``: ``cohort_speed``'s cohort/separate time ratio for one pair; a further repeat only where it fits;
* ``teacher_outputs_*``: ``teacher_outputs_speed``'s measurement of one teacher with three students trained as
  separate runs, in cohorts and from stored teacher outputs, once with the ``cifar100-ofa`` methods (each cohort
  holds FitNet, which runs the teacher live) and once with methods that all read stored outputs; a further repeat
  only where it fits;
* ``resume``: one run trained straight through, the same run stopped mid-epoch by a stop request (the trainer's
  ``should_stop``, as a SIGTERM or Slurm's USR2 asks) and resumed, and a second straight run: the two straight
  runs' difference is the device's own nondeterminism, against which the resumed run's difference is judged;
* ``overhead_compile_baselines_*`` then ``overhead_compile_methods_*``: the overhead measurement with
  ``train.compile``, the baselines (none, kd) of every pair before the other methods (compiling is slow: a
  budget that runs out keeps the ratios' references).

Every part writes what it has measured as it goes (atomically: a part killed at its budget keeps the methods,
repeats or runs it finished). The budget is shared in proportion to each part's planned share of what is left
when it starts, so the time a part does not use passes on to the ones after it.

OUTDIR gets ``summary.json`` and ``summary.md`` (rewritten after every part: a check cut short still has one)
and ``raw/<part>.json`` + ``raw/<part>.log``. ``--tiny`` runs every part at toy sizes (the demo's *_mini
models, 32 px, a few steps) so that a test can run the whole check on a CPU.

    python -m hkdbench.benchmark.tools.gpu_check OUTDIR [--tiny] [--budget-s 400] [--data-root DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hkdbench.benchmark.core.store import atomic_write_bytes
from hkdbench.benchmark.tools.cohort_speed import OFA_METHODS
from hkdbench.benchmark.tools.teacher_outputs_speed import LOGIT_READERS

# overhead.BASELINES (the ratios' references), named here so that the parent process never imports torch
BASELINES = ("none", "kd")

Pair = Tuple[str, str]


@dataclass(frozen=True)
class Sizes:
    """How big each part is, and its planned share of the time budget (seconds, in proportion to the others)."""
    overhead_pairs: Tuple[Pair, ...]
    overhead_batch: int
    overhead_img: int
    overhead_warmup: int
    overhead_repeats: int
    precision: str
    cohort_pairs: Tuple[Pair, ...]
    cohort_methods: Tuple[str, ...]
    cohort_batches: Tuple[int, ...]      # one per cohort pair
    cohort_steps: Tuple[int, ...]        # one per cohort pair
    cohort_repeats: int                  # at most: a repeat that would not end within the part's budget is left
    resume_pair: Pair
    resume_batch: int
    resume_steps: int                    # steps per epoch; two epochs, stopped mid-way through the second
    stream_pair: Pair
    stream_img: int
    stream_batch: int
    stream_steps: int                    # batches per timed turn
    stream_repeats: int                  # at most, as cohort_repeats
    outputs_teacher: str                 # the teacher-outputs parts: one teacher, its students, a part per
    outputs_students: Tuple[str, ...]    # (label, methods) of outputs_plans
    outputs_plans: Tuple[Tuple[str, Tuple[str, ...]], ...]
    outputs_batch: int
    outputs_steps: int
    outputs_repeats: int                 # at most, as cohort_repeats
    shares: Dict[str, float] = field(default_factory=dict)
    cohort_shares: Tuple[float, ...] = ()  # one per cohort pair


FULL = Sizes(overhead_pairs=(("swin_tiny", "resnet18"), ("convnext_tiny", "deit_tiny")), overhead_batch=128,
             overhead_img=224, overhead_warmup=3, overhead_repeats=10, precision="bf16",
             cohort_pairs=(("swin_tiny", "resnet18"), ("resnet_mini", "vit_mini")), cohort_methods=OFA_METHODS,
             cohort_batches=(32, 128), cohort_steps=(12, 20), cohort_repeats=3,
             resume_pair=("swin_tiny", "resnet18"), resume_batch=32, resume_steps=6,
             stream_pair=("resnet18", "deit_tiny"), stream_img=224, stream_batch=128, stream_steps=8,
             stream_repeats=5,
             outputs_teacher="swin_tiny", outputs_students=("resnet18", "mobilenetv2_100", "deit_tiny"),
             outputs_plans=(("ofa", OFA_METHODS), ("logits", LOGIT_READERS)), outputs_batch=32, outputs_steps=8,
             outputs_repeats=3,
             shares={"env": 10, "overhead_eager": 40, "stream": 30, "resume": 60, "outputs": 55,
                     "compile_baselines": 40, "compile_methods": 40},
             cohort_shares=(75, 30))
# the plumbing only: one pair each, two methods that share the teacher in the cohort
TINY = Sizes(overhead_pairs=(("swin_mini", "resnet_mini"),), overhead_batch=8, overhead_img=32, overhead_warmup=1,
             overhead_repeats=2, precision="fp32", cohort_pairs=(("resnet_mini", "vit_mini"),),
             cohort_methods=("kd", "dkd"), cohort_batches=(16,), cohort_steps=(2,), cohort_repeats=1,
             resume_pair=("resnet_mini", "vit_mini"), resume_batch=16, resume_steps=3,
             stream_pair=("resnet_mini", "vit_mini"), stream_img=32, stream_batch=16, stream_steps=2,
             stream_repeats=2, outputs_teacher="resnet_mini", outputs_students=("vit_mini", "mixer_mini"),
             outputs_plans=(("ofa", ("kd", "fitnet")), ("logits", ("kd", "dkd"))), outputs_batch=8, outputs_steps=1,
             outputs_repeats=1,
             shares={"env": 30, "overhead_eager": 60, "stream": 45, "resume": 90, "outputs": 60,
                     "compile_baselines": 60, "compile_methods": 60},
             cohort_shares=(90,))


@dataclass(frozen=True)
class Part:
    name: str
    kind: str                            # a key of PARTS
    args: Dict[str, Any]
    share_s: float                       # its planned share of the budget, in proportion to the other parts'


def plan(sizes: Sizes, device: Optional[str], data_root: Optional[str], compile_parts: bool) -> List[Part]:
    """The parts in the order they run: the cheap and sure ones first (the stream part, like the cohort parts,
    measures the repeats that fit), compile (slow to warm up) last, with the baselines of every pair before any
    other compiled method."""
    sh = sizes.shares
    overhead = dict(device=device, batch_size=sizes.overhead_batch, img_size=sizes.overhead_img,
                    warmup=sizes.overhead_warmup, repeats=sizes.overhead_repeats, precision=sizes.precision)
    others = [m for m in OFA_METHODS if m not in BASELINES]

    def overhead_parts(prefix: str, share: float, methods: Sequence[str], compile: bool) -> List[Part]:
        return [Part(f"{prefix}_{t}_{s}", "overhead", dict(overhead, teacher=t, student=s, methods=list(methods),
                                                           compile=compile), share)
                for t, s in sizes.overhead_pairs]

    parts = [Part("env", "env", {"device": device}, sh["env"])]
    parts += overhead_parts("overhead_eager", sh["overhead_eager"], list(BASELINES) + others, compile=False)
    teacher, student = sizes.stream_pair
    parts.append(Part(f"stream_{teacher}_{student}", "stream", dict(
        device=device, teacher=teacher, student=student, img_size=sizes.stream_img, batch_size=sizes.stream_batch,
        steps=sizes.stream_steps, repeats=sizes.stream_repeats, precision=sizes.precision, data_root=data_root),
        sh["stream"]))
    parts += [Part(f"cohort_{t}_{s}", "cohort", dict(device=device, teacher=t, student=s, data_root=data_root,
                                                     methods=list(sizes.cohort_methods), batch_size=batch,
                                                     steps=steps, repeats=sizes.cohort_repeats), share)
              for (t, s), batch, steps, share in zip(sizes.cohort_pairs, sizes.cohort_batches, sizes.cohort_steps,
                                                     sizes.cohort_shares)]
    parts.append(Part("resume", "resume", dict(device=device, teacher=sizes.resume_pair[0],
                                               student=sizes.resume_pair[1], batch_size=sizes.resume_batch,
                                               steps=sizes.resume_steps, data_root=data_root), sh["resume"]))
    parts += [Part(f"teacher_outputs_{label}_{sizes.outputs_teacher}", "teacher_outputs", dict(
        device=device, teacher=sizes.outputs_teacher, students=list(sizes.outputs_students), methods=list(methods),
        batch_size=sizes.outputs_batch, steps=sizes.outputs_steps, repeats=sizes.outputs_repeats,
        data_root=data_root), sh["outputs"]) for label, methods in sizes.outputs_plans]
    if compile_parts:
        parts += overhead_parts("overhead_compile_baselines", sh["compile_baselines"], BASELINES, compile=True)
        parts += overhead_parts("overhead_compile_methods", sh["compile_methods"], others, compile=True)
    return parts


def part_budget(left_s: float, shares: Sequence[float]) -> float:
    """The first of ``shares``' parts gets its share of the time left, in proportion to the shares of the parts
    still to run: what the parts before it did not use passes on to it and the ones after it."""
    total = sum(shares)
    return left_s * shares[0] / total if total > 0 else 0.0


def _write_json(path: Path, body: Any) -> None:
    """The store's atomic write, keeping the parts' own key order (methods in measured order)."""
    atomic_write_bytes(path, (json.dumps(body, indent=2, default=str) + "\n").encode())


# --------------------------------------------------------------------------------------------------------------
# The parts (each runs in a process of its own and writes its raw JSON to ``out``)
# --------------------------------------------------------------------------------------------------------------

def part_env(out: Path, device: Optional[str]) -> None:
    import torch

    from hkdbench.benchmark.tools.cohort_speed import compile_available
    from hkdbench.benchmark.engine.environment import environment
    from hkdbench.benchmark.engine.evaluation import select_device

    dev = select_device(device)
    env = environment(dev)
    env.update({"cuda_available": torch.cuda.is_available(), "train_compile_available": compile_available(),
                "overhead_compile_available": overhead_compile_available()})
    if dev.type == "cuda":
        env.update({"capability": list(torch.cuda.get_device_capability(dev)),
                    "bf16_supported": torch.cuda.is_bf16_supported(),
                    "memory_gib": torch.cuda.get_device_properties(dev).total_memory / 2 ** 30})
    _write_json(out, env)


def overhead_compile_available() -> bool:
    """Whether the trainer's setup (which ``hkdbench overhead`` times) can compile the trained modules."""
    from hkdbench.benchmark.engine.step import setup_training

    return "compile" in inspect.signature(setup_training).parameters


def part_overhead(out: Path, device: Optional[str], teacher: str, student: str, methods: Sequence[str],
                  batch_size: int, img_size: int, warmup: int, repeats: int, precision: str, compile: bool) -> None:
    """``hkdbench overhead``'s measurement of ``methods`` in their order, the file rewritten after each one (the
    ratios to the baselines measured in this part; the summary adds them across parts)."""
    import torch

    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.tools.overhead import add_ratios, measure_method

    dev = select_device(device)
    base = OverheadConfig(teacher=teacher, student=student, method="none", batch_size=batch_size,
                          img_size=img_size, warmup=warmup, repeats=repeats, precision=precision, device=str(dev))
    if compile:
        if not overhead_compile_available():
            raise RuntimeError("train.compile not available: this version's setup_training cannot compile")
        base = dataclasses.replace(base, compile=True)
    body: Dict[str, Any] = {"config": dataclasses.asdict(base), "methods": {}}
    if not compile:  # one-time costs, as run_overhead does (compiled, it would be one more compile to wait for)
        measure_method(dataclasses.replace(base, warmup=1, repeats=1))
    measured: Dict[str, Any] = {}
    for name in methods:
        try:
            body["methods"][name] = measure_method(dataclasses.replace(base, method=name))
        except Exception as err:  # an out-of-memory or an unsupported pair: recorded, the next method goes on
            body["methods"][name] = {"error": f"{type(err).__name__}: {err}"}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        measured = {m: r for m, r in body["methods"].items() if "error" not in r}
        add_ratios(measured)
        _write_json(out, body)
    failed = sorted(set(body["methods"]) - set(measured))
    if failed:
        raise RuntimeError(f"not measured: {', '.join(failed)} (their errors are in {out.name})")


def part_cohort(out: Path, device: Optional[str], teacher: str, student: str, methods: Sequence[str],
                batch_size: int, steps: int, repeats: int, data_root: Optional[str],
                deadline: Optional[float] = None) -> None:
    """The cohort/separate ratio, written after each repeat; another repeat only where it ends before
    ``deadline`` (the part's budget)."""
    from hkdbench.benchmark.tools.cohort_speed import measure_pair, pair_setting

    with tempfile.TemporaryDirectory(prefix="gpu_check_cohort_") as work:
        measure_pair(pair_setting(teacher, student, batch_size), methods, steps, repeats, Path(work), device,
                     data_root, deadline=deadline, on_progress=lambda result: _write_json(out, result))


def part_teacher_outputs(out: Path, device: Optional[str], teacher: str, students: Sequence[str],
                         methods: Sequence[str], batch_size: int, steps: int, repeats: int, data_root: Optional[str],
                         deadline: Optional[float] = None) -> None:
    """``teacher_outputs_speed``'s separate / cohorts / stored timing, written after the warm-up (the plan's teacher
    passes) and after each repeat; another repeat only where it ends before ``deadline`` (the part's budget)."""
    from hkdbench.benchmark.tools.teacher_outputs_speed import measure

    with tempfile.TemporaryDirectory(prefix="gpu_check_outputs_") as work:
        measure(teacher, students, methods, steps, repeats, Path(work), device, batch_size, data_root,
                deadline=deadline, on_progress=lambda result: _write_json(out, result))


def part_stream(out: Path, device: Optional[str], teacher: str, student: str, img_size: int, batch_size: int,
                steps: int, repeats: int, precision: str, data_root: Optional[str],
                deadline: Optional[float] = None) -> None:
    """``stream_speed``'s measurement, written once the stream's host syncs are counted and after each repeat;
    another repeat only where it ends before ``deadline`` (the part's budget)."""
    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.tools import stream_speed

    args = stream_speed.options(device=str(select_device(device)), teacher=teacher, student=student,
                                img_size=img_size, batch_size=batch_size, steps=steps, repeats=repeats,
                                precision=precision, data_root=data_root)
    stream_speed.run(args, deadline=deadline, on_progress=lambda result: _write_json(out, result))


TIME_KEYS = ("epoch_time_s", "images_per_s")
# the resumed run may differ from the straight runs by this many times their difference from each other
NOISE_FACTOR = 4.0


def part_resume(out: Path, device: Optional[str], teacher: str, student: str, batch_size: int, steps: int,
                data_root: Optional[str], method: str = "kd") -> None:
    """A straight run; the same run stopped mid-way through its second epoch, then resumed; a second straight
    run, whose difference from the first is the device's nondeterminism. Written after each."""
    from hkdbench.benchmark.tools.cohort_speed import pair_setting, run_configs, save_random_teacher

    setting = pair_setting(teacher, student, batch_size)
    with tempfile.TemporaryDirectory(prefix="gpu_check_resume_") as work:
        work_dir = Path(work)
        checkpoint = save_random_teacher(setting, work_dir)
        cfg = run_configs(setting, checkpoint, [method], steps, data_root, extra=["train.epochs=2"])[0]
        body: Dict[str, Any] = {"pair": f"{teacher} -> {student}", "method": method, "img_size": setting.img_size,
                                "batch_size": batch_size, "steps_per_epoch": steps, "epochs": 2}
        first = _train_run(cfg, work_dir / "straight_1", device)
        body.update(device=first.summary["device"], straight=[first.status])
        _write_json(out, body)
        mid_second_epoch = steps + steps // 2 + 1  # steps done when the stop arrives
        stopped, resumed, stopped_at = _stop_and_resume(cfg, work_dir / "stopped", device, mid_second_epoch)
        body.update(stopped=stopped.status, resumed=resumed.status, stopped_at=stopped_at,
                    resumed_vs_straight=compare_runs(first, resumed))
        body.update(resume_verdict(body))
        _write_json(out, body)
        second = _train_run(cfg, work_dir / "straight_2", device)
        body["straight"].append(second.status)
        body.update(straight_vs_straight=compare_runs(first, second),
                    resumed_vs_second_straight=compare_runs(second, resumed))
        body.update(resume_verdict(body))
    _write_json(out, body)


def _train_run(cfg, runs_dir: Path, device: Optional[str], **kwargs):
    from hkdbench.benchmark.engine.trainer import train

    return train(cfg, runs_dir=str(runs_dir), device=device, progress=False, echo=False, **kwargs)


def _stop_and_resume(cfg, runs_dir: Path, device: Optional[str], stop_after: int):
    """The run stopped by a stop request once ``stop_after`` steps are done, then resumed; and where it stopped."""
    import torch

    calls = {"n": 0}

    def stop_requested() -> bool:
        calls["n"] += 1
        return calls["n"] >= stop_after

    stopped = _train_run(cfg, runs_dir, device, should_stop=stop_requested)
    saved = torch.load(stopped.run_dir.checkpoint_file, map_location="cpu", weights_only=False)
    resumed = _train_run(cfg, runs_dir, device, resume=True)
    return stopped, resumed, {"epoch": saved["epoch"] + 1, "step": saved["step"]}


def compare_runs(a, b) -> Dict[str, Any]:
    """Two finished runs: their epoch records and final weights."""
    import torch

    return {**compare_metrics(a.run_dir.metrics(), b.run_dir.metrics()),
            **compare_weights(torch.load(a.run_dir.weights_file("last"), map_location="cpu"),
                              torch.load(b.run_dir.weights_file("last"), map_location="cpu"))}


def _distances(comparison: Dict[str, Any]) -> Dict[str, float]:
    """A comparison as one distance per axis (the largest absolute difference; inf where not a number)."""
    metric_diffs = list(comparison.get("metrics_max_abs_diff", {}).values())
    metrics = (float("inf") if "metrics_note" in comparison or any(isinstance(v, str) for v in metric_diffs)
               else max(metric_diffs, default=0.0))
    weights = float("inf") if "weights_note" in comparison else comparison["weights_max_abs_diff"]
    return {"metrics": metrics, "weights": weights}


def resume_verdict(body: Dict[str, Any]) -> Dict[str, str]:
    """Whether the resumed run differs from the straight runs by more than they differ from each other:
    ``equal`` (bit for bit), ``nondeterminism`` (within NOISE_FACTOR times the straight runs' own difference),
    ``resume_bug``, or ``undecided`` (it differs and the second straight run is not there to judge it)."""
    resumed = body["resumed_vs_straight"]
    if resumed["metrics_equal"] and resumed["weights_equal"]:
        return {"verdict": "equal", "verdict_note": "the resumed run matches the straight run bit for bit"}
    if "straight_vs_straight" not in body:
        return {"verdict": "undecided", "verdict_note": "the resumed run differs from the straight run; the second "
                                                        "straight run, which tells nondeterminism apart, is missing"}
    noise = _distances(body["straight_vs_straight"])
    off = {axis: max(d, _distances(body["resumed_vs_second_straight"])[axis])
           for axis, d in _distances(resumed).items()}
    for axis in ("weights", "metrics"):
        if off[axis] > NOISE_FACTOR * noise[axis]:
            return {"verdict": "resume_bug", "verdict_note": f"{axis}: the resumed run differs from the straight "
                    f"runs by {off[axis]:.3g}, the straight runs from each other by {noise[axis]:.3g}"}
    return {"verdict": "nondeterminism", "verdict_note": f"the resumed run differs from the straight runs by "
            f"{off['weights']:.3g} (weights), as they differ from each other ({noise['weights']:.3g})"}


def compare_metrics(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Epoch records compared key by key (times excluded: they differ by nature)."""
    if len(a) != len(b):
        return {"metrics_equal": False, "metrics_note": f"{len(a)} epochs against {len(b)}"}
    diffs: Dict[str, float] = {}
    for ra, rb in zip(a, b):
        for key in sorted((set(ra) | set(rb)) - set(TIME_KEYS)):
            va, vb = ra.get(key), rb.get(key)
            numbers = isinstance(va, (int, float)) and isinstance(vb, (int, float))
            if numbers and isinstance(diffs.get(key, 0.0), (int, float)):
                diffs[key] = max(diffs.get(key, 0.0), abs(va - vb))
            elif va != vb:  # a value missing on one side, or not a number: both, as JSON can hold them
                diffs[key] = f"{va!r} against {vb!r}"
    differing = {k: v for k, v in diffs.items() if v != 0}
    return {"metrics_equal": not differing, "metrics_max_abs_diff": differing}


def compare_weights(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    """Two state dicts: equal bit for bit, or the largest absolute difference and how many tensors differ."""
    import torch

    if a.keys() != b.keys():
        return {"weights_equal": False, "weights_note": "different keys"}
    differing, worst = 0, 0.0
    for key in a:
        x, y = a[key], b[key]
        if not torch.equal(x, y):
            differing += 1
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return {"weights_equal": differing == 0, "weights_tensors": len(a), "weights_tensors_differing": differing,
            "weights_max_abs_diff": worst}


PARTS: Dict[str, Callable[..., None]] = {"env": part_env, "overhead": part_overhead, "stream": part_stream,
                                         "cohort": part_cohort, "resume": part_resume,
                                         "teacher_outputs": part_teacher_outputs}


# --------------------------------------------------------------------------------------------------------------
# Running the parts
# --------------------------------------------------------------------------------------------------------------

def run_part(part: Part, raw: Path, timeout_s: float) -> Dict[str, Any]:
    """The part in a child process (``--run-part``), killed at ``timeout_s``; its record for the summary, with
    what it wrote before it ended (all of it, or what it had measured when it was killed)."""
    out, log = raw / f"{part.name}.json", raw / f"{part.name}.log"
    spec = json.dumps({"kind": part.kind, "args": part.args, "out": str(out), "deadline": time.time() + timeout_s})
    record: Dict[str, Any] = {"name": part.name, "kind": part.kind, "budget_s": round(timeout_s, 1),
                              "raw": out.name, "log": log.name}
    tic = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, "-m", "hkdbench.benchmark.tools.gpu_check", "--run-part", spec],
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = wait_for_part(child, out, timeout_s)
            record["status"] = "ok" if code == 0 else "failed"
            record["exit_code"] = code
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)  # the child and anything it started (compile workers)
            child.wait()
            record["status"] = "timeout"
    record["seconds"] = round(time.perf_counter() - tic, 1)
    if record["status"] == "timeout":
        record["error"] = f"{_log_tail(log)}\nkilled at its budget of {timeout_s:.0f} s".strip()
    elif record["status"] != "ok":
        record["error"] = _log_tail(log)
    if out.exists():
        record["result"] = json.loads(out.read_text())
    return record


def wait_for_part(child: subprocess.Popen, out: Path, timeout_s: float) -> int:
    """The child's exit code; TimeoutExpired past ``timeout_s``. (``out``, the file the child writes as it
    goes, is for a test's stand-in that ends the wait once something is written.)"""
    return child.wait(timeout=timeout_s)


def _log_tail(log: Path, lines: int = 12) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


MIN_PART_S = 5.0  # a part given less is skipped: it would not get past its imports


def run_check(outdir: Path, sizes: Sizes, budget_s: float, device: Optional[str], data_root: Optional[str],
              compile_parts: bool, tiny: bool, install: Optional[str] = None) -> Dict[str, Any]:
    raw = outdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    parts = plan(sizes, device, data_root, compile_parts)
    shares = [p.share_s for p in parts]
    deadline = time.monotonic() + budget_s
    summary: Dict[str, Any] = {"tiny": tiny, "budget_s": budget_s, "device_requested": device, "install": install,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sizes": dataclasses.asdict(sizes),
                               "parts": []}
    for i, part in enumerate(parts):
        budget = part_budget(deadline - time.monotonic(), shares[i:])
        planned = {"planned_s": round(budget_s * part.share_s / sum(shares), 1)}
        if budget < MIN_PART_S:
            record = {"name": part.name, "kind": part.kind, "status": "skipped", **planned,
                      "error": "no time left in the budget"}
        else:
            print(f"gpu-check: {part.name} (budget {budget:.0f} s)", flush=True)
            record = {**run_part(part, raw, budget), **planned}
            print(f"gpu-check: {part.name}: {record['status']} in {record['seconds']} s", flush=True)
        summary["parts"].append(record)
        summary["seconds"] = round(budget_s - max(deadline - time.monotonic(), 0), 1)
        write_summary(outdir, summary)
    if not compile_parts:
        summary["parts"].append({"name": "overhead_compile", "kind": "overhead", "status": "skipped",
                                 "error": "compile parts skipped (--no-compile-parts; the default under --tiny, "
                                          "where compiling on a CPU would take minutes)"})
        write_summary(outdir, summary)
    return summary


# --------------------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------------------

def write_summary(outdir: Path, summary: Dict[str, Any]) -> None:
    _write_json(outdir / "summary.json", summary)
    atomic_write_bytes(outdir / "summary.md", summary_markdown(summary).encode())


def summary_markdown(summary: Dict[str, Any]) -> str:
    parts = {p["name"]: p for p in summary["parts"]}
    env = parts.get("env", {}).get("result", {})
    lines = ["# GPU check" + (" (tiny sizes)" if summary["tiny"] else ""), "",
             f"device {env.get('gpu') or env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"timm {env.get('timm', '?')}, CUDA {env.get('cuda', '-')}, git {env.get('git_sha', '?')}; "
             f"started {summary['started']}, {summary.get('seconds', 0):.0f} s of a {summary['budget_s']:.0f} s "
             f"budget; install: {summary.get('install') or 'not by the script'}", "",
             "| part | status | seconds | note |", "|---|---|---:|---|"]
    for p in summary["parts"]:
        note = (p.get("error") or "").strip().splitlines()
        lines.append(f"| {p['name']} | {p['status']} | {p.get('seconds', '-')} | {note[-1][:160] if note else ''} |")
    lines += (_overhead_markdown(summary["parts"]) + _stream_markdown(summary["parts"])
              + _cohort_markdown(summary["parts"]) + _resume_markdown(parts)
              + _teacher_outputs_markdown(summary["parts"]))
    return "\n".join(lines) + "\n"


def merged_overhead(parts: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """The overhead parts' methods by pair and mode (eager, compile), with the ratios taken across the parts of
    the same pair and mode (the compiled methods' to the compiled baselines of their own part)."""
    from hkdbench.benchmark.tools.overhead import add_ratios

    by_pair: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for p in parts:
        result = p.get("result")
        if p["kind"] == "overhead" and result:
            c = result["config"]
            pair = (f"{c['teacher']} -> {c['student']}, {c['img_size']} px, batch {c['batch_size']}, "
                    f"{c['precision']}, {c['device']}")
            by_pair.setdefault(pair, {}).setdefault("compile" if c.get("compile") else "eager", {}).update(
                {m: dict(r) for m, r in result["methods"].items()})
    for modes in by_pair.values():
        for methods in modes.values():
            add_ratios({m: r for m, r in methods.items() if "error" not in r})
    return by_pair


def _overhead_markdown(parts: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    for pair, modes in merged_overhead(parts).items():
        lines += ["", f"## Overhead: {pair}", "",
                  "| method | mode | images/s | step ms | peak MiB | GFLOP/img | step vs none | step vs kd |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for mode, methods in modes.items():
            for name, r in methods.items():
                if "error" in r:
                    lines.append(f"| {name} | {mode} | {r['error'][:120]} | | | | | |")
                    continue
                lines.append(f"| {name} | {mode} | {r['images_per_s']:.1f} | {r['step_time_ms']:.2f} | "
                             f"{_num(r['peak_memory_mb'])} | {r['train_gflops_per_image']:.2f} | "
                             f"{_num(r.get('step_time_ms_vs_none'), '.2f')} | "
                             f"{_num(r.get('step_time_ms_vs_kd'), '.2f')} |")
    return lines


def _cohort_markdown(parts: List[Dict[str, Any]]) -> List[str]:
    from hkdbench.benchmark.tools.cohort_speed import format_results

    results = [p["result"] for p in parts if p["kind"] == "cohort" and p.get("result")]
    if not results:
        return []
    methods = ", ".join(results[0]["methods"])
    done = ", ".join(f"{r['teacher']} -> {r['student']} {r['repeats_done']} of {r['repeats']}" for r in results)
    return ["", f"## Cohort against separate runs ({methods})", "", format_results(results), "",
            f"Repeats measured within the budget: {done}."]


def _teacher_outputs_markdown(parts: List[Dict[str, Any]]) -> List[str]:
    from hkdbench.benchmark.tools.teacher_outputs_speed import format_result

    lines: List[str] = []
    for r in (p["result"] for p in parts if p["kind"] == "teacher_outputs" and p.get("result")):
        lines += ["", f"## Teacher outputs: separate runs, cohorts, stored ({', '.join(r['methods'])})", ""]
        if not r["repeats_done"]:
            lines.append(f"{r['teacher']} -> {', '.join(r['students'])}, {r['img_size']} px, batch "
                         f"{r['batch_size']}: no repeat measured within the budget (the warm-up, one cohort of one "
                         f"step, took {r['warmup_s']:.1f} s).")
            continue
        head, *table, outputs = format_result(r).splitlines()  # blank lines around the table, for Markdown
        lines += [head,
                  "", *table, "", f"{outputs.strip('()').capitalize()}. Each way's median time over the separate "
                  "runs' (per repeat, interleaved); the teacher share is its forward times the passes a step over the "
                  "way's time."]
    return lines


def _stream_markdown(parts: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    for r in (p["result"] for p in parts if p["kind"] == "stream" and p.get("result")):
        counter = "torch's sync debug mode" if r["device"].startswith("cuda") else "host reads, the CPU's counter"
        lines += ["", f"## Data stream: cifar-vit, kd {r['teacher']} -> {r['student']}, {r['img_size']} px, batch "
                  f"{r['batch_size']}, {r['precision']}, {r['device_name']}", "",
                  f"Host syncs of one batch of the stream: **{r['stream_host_syncs_per_batch']}** ({counter})"
                  + "".join(f"; {n} x {m[:120]}" for m, n in Counter(r["stream_host_syncs"]).items()) + "."]
        if not r["repeats_done"]:
            lines += ["", "No repeat measured within the budget."]
            continue
        rates = r["median_images_per_s"]
        lines += ["", "| stream img/s | step img/s | serial img/s | overlap img/s | overlap / serial | "
                      "serial / parts in turn | overlap / parts in turn |", "|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {rates['stream']:.1f} | {rates['step']:.1f} | {rates['serial']:.1f} | {rates['overlap']:.1f} "
                  f"| {r['overlap_over_serial']:.3f} | {r['serial_over_parts']:.3f} | {r['overlap_over_parts']:.3f} |",
                  "", f"Medians of {r['repeats_done']} of {r['repeats']} repeats (each a turn of {r['steps']} "
                      f"batches per contender, interleaved); `overlap` draws the next batch inside the step, before "
                      f"its host read."]
    return lines


def _comparison_text(c: Dict[str, Any]) -> str:
    metrics = "equal" if c["metrics_equal"] else f"differ: {c.get('metrics_max_abs_diff') or c.get('metrics_note')}"
    weights = ("equal bit for bit" if c["weights_equal"] else
               f"{c.get('weights_tensors_differing')} of {c.get('weights_tensors')} tensors differ, largest "
               f"absolute difference {c.get('weights_max_abs_diff')}")
    return f"metrics {metrics}; final weights {weights}"


def _resume_markdown(parts: Dict[str, Dict[str, Any]]) -> List[str]:
    r = parts.get("resume", {}).get("result")
    if not r or "resumed_vs_straight" not in r:
        return []
    lines = ["", f"## Stop and resume: {r['method']} {r['pair']}", "",
             f"{r['epochs']} epochs of {r['steps_per_epoch']} steps on {r['device']}; stopped at epoch "
             f"{r['stopped_at']['epoch']}, step {r['stopped_at']['step']} ({r['stopped']}), resumed ({r['resumed']}).",
             "", f"- resumed against the straight run: {_comparison_text(r['resumed_vs_straight'])}"]
    if "straight_vs_straight" in r:
        lines += [f"- resumed against the second straight run: {_comparison_text(r['resumed_vs_second_straight'])}",
                  f"- the two straight runs against each other: {_comparison_text(r['straight_vs_straight'])}"]
    return lines + ["", f"Verdict: **{r['verdict']}** ({r['verdict_note']})."]


def _num(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    function = PARTS[spec["kind"]]
    args = dict(spec["args"])
    if "deadline" in inspect.signature(function).parameters:  # the parts that plan their work by the time left
        args["deadline"] = spec["deadline"]
    try:
        function(Path(spec["out"]), **args)
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hkdbench.benchmark.tools.gpu_check",
                                description="the GPU check: overhead, cohort and resume measurements into OUTDIR")
    p.add_argument("outdir", nargs="?")
    p.add_argument("--tiny", action="store_true", help="toy sizes (*_mini models, 32 px, a few steps), for a CPU")
    p.add_argument("--budget-s", type=float, default=400.0, help="seconds for all the parts together")
    p.add_argument("--device", default=None, help="cuda, cpu (default: CUDA when present)")
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: the dataset's own lookup)")
    p.add_argument("--compile-parts", dest="compile_parts", action="store_true", default=None,
                   help="measure overhead with compile too (the default, except under --tiny)")
    p.add_argument("--no-compile-parts", dest="compile_parts", action="store_false")
    p.add_argument("--install", default=None, help="how the project was installed (gpu-check.sh says)")
    p.add_argument("--run-part", default=None, help=argparse.SUPPRESS)  # the child of run_part
    args = p.parse_args(argv)
    if args.run_part:
        return _child(args.run_part)
    if not args.outdir:
        p.error("OUTDIR is required")
    if args.budget_s < 30:
        p.error(f"--budget-s must be at least 30 seconds, got {args.budget_s}")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        p.error(f"OUTDIR {outdir} exists and is not a folder")
    if (outdir / "raw").exists():
        shutil.rmtree(outdir / "raw")  # a fresh check: no raw file of an earlier one mixes in
    compile_parts = (not args.tiny) if args.compile_parts is None else args.compile_parts
    summary = run_check(outdir, TINY if args.tiny else FULL, args.budget_s, args.device, args.data_root,
                        compile_parts, args.tiny, args.install)
    failed = [p["name"] for p in summary["parts"] if p["status"] not in ("ok", "skipped")]
    print(f"gpu-check: wrote {outdir / 'summary.md'} and {outdir / 'summary.json'}"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
