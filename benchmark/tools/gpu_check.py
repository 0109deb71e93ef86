"""The GPU check (``scripts/gpu-check.sh OUTDIR``): what one GPU does with this harness, in about 8 minutes.

Its parts, each in its own process with its own time budget, so that a crash, an out-of-memory or a timeout of
one part is recorded (status, error, the tail of its log) and the others still run:

* ``env``: versions, the GPU, whether ``train.compile`` exists in this version;
* ``overhead_eager_*`` / ``overhead_compile_*``: ``hkdbench overhead``'s measurement (``measure_method``: the
  trainer's own step) at 224 px, batch 128, bf16 + channels_last, per method: images/s, step time, peak memory,
  FLOPs, with ratios to ``none`` and ``kd``; without and with compile, for ``swin_tiny -> resnet18`` and
  ``convnext_tiny -> deit_tiny``. Each method's result is written as soon as it is measured, so a timeout keeps
  the methods done;
* ``cohort_*``: ``cohort_speed``'s cohort/separate time ratio for one pair;
* ``resume``: one run trained straight through, and the same run stopped mid-epoch by a stop request (the
  trainer's ``should_stop``, as a SIGTERM or Slurm's USR2 asks) and resumed; their metrics and final weights
  compared (equal, or the largest differences).

OUTDIR gets ``summary.json`` and ``summary.md`` (rewritten after every part: a check cut short still has one)
and ``raw/<part>.json`` + ``raw/<part>.log``. ``--tiny`` runs every part at toy sizes (the demo's *_mini
models, 32 px, a few steps) so that a test can run the whole check on a CPU.

    python -m hkdbench.benchmark.tools.gpu_check OUTDIR [--tiny] [--budget-s 420] [--data-root DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from hkdbench.benchmark.tools.cohort_speed import OFA_METHODS
from hkdbench.benchmark.core.store import atomic_write_bytes

Pair = Tuple[str, str]


@dataclass(frozen=True)
class Sizes:
    """How big each part is, and its share of the time budget (seconds at the default budget)."""
    overhead_pairs: Tuple[Pair, ...]
    overhead_batch: int
    overhead_img: int
    overhead_warmup: int
    overhead_repeats: int
    precision: str
    cohort_pairs: Tuple[Pair, ...]
    cohort_methods: Tuple[str, ...]
    cohort_batches: Tuple[int, ...]      # one per cohort pair
    cohort_steps: int
    cohort_repeats: int
    resume_pair: Pair
    resume_batch: int
    resume_steps: int                    # steps per epoch; two epochs, stopped mid-way through the second
    budgets: Dict[str, float] = field(default_factory=dict)


FULL = Sizes(overhead_pairs=(("swin_tiny", "resnet18"), ("convnext_tiny", "deit_tiny")), overhead_batch=128,
             overhead_img=224, overhead_warmup=3, overhead_repeats=10, precision="bf16",
             cohort_pairs=(("swin_tiny", "resnet18"), ("resnet_mini", "vit_mini")), cohort_methods=OFA_METHODS,
             cohort_batches=(32, 128),
             cohort_steps=20, cohort_repeats=2, resume_pair=("swin_tiny", "resnet18"), resume_batch=32,
             resume_steps=8,
             budgets={"env": 20, "overhead_eager": 45, "cohort": 60, "resume": 45, "overhead_compile": 80})
# the plumbing only: one pair each, two methods that share the teacher in the cohort
TINY = Sizes(overhead_pairs=(("swin_mini", "resnet_mini"),), overhead_batch=8, overhead_img=32, overhead_warmup=1,
             overhead_repeats=2, precision="fp32", cohort_pairs=(("resnet_mini", "vit_mini"),),
             cohort_methods=("kd", "dkd"), cohort_batches=(16,), cohort_steps=2, cohort_repeats=1,
             resume_pair=("resnet_mini", "vit_mini"), resume_batch=16, resume_steps=3,
             budgets={"env": 30, "overhead_eager": 60, "cohort": 90, "resume": 60, "overhead_compile": 60})


@dataclass(frozen=True)
class Part:
    name: str
    kind: str                            # a key of PARTS
    args: Dict[str, Any]
    budget_s: float


def plan(sizes: Sizes, device: Optional[str], data_root: Optional[str], compile_parts: bool,
         scale: float = 1.0) -> List[Part]:
    """The parts in the order they run: the cheap and sure ones first, compile (slow to warm up) last."""
    def part(name, kind, budget_key, **args):
        return Part(name, kind, {"device": device, **args}, sizes.budgets[budget_key] * scale)

    overhead = dict(batch_size=sizes.overhead_batch, img_size=sizes.overhead_img, warmup=sizes.overhead_warmup,
                    repeats=sizes.overhead_repeats, precision=sizes.precision, methods=list(OFA_METHODS))
    parts = [part("env", "env", "env")]
    parts += [part(f"overhead_eager_{t}_{s}", "overhead", "overhead_eager", teacher=t, student=s, compile=False,
                   **overhead) for t, s in sizes.overhead_pairs]
    parts += [part(f"cohort_{t}_{s}", "cohort", "cohort", teacher=t, student=s, data_root=data_root,
                   methods=list(sizes.cohort_methods), batch_size=batch, steps=sizes.cohort_steps,
                   repeats=sizes.cohort_repeats) for (t, s), batch in zip(sizes.cohort_pairs, sizes.cohort_batches)]
    parts.append(part("resume", "resume", "resume", teacher=sizes.resume_pair[0], student=sizes.resume_pair[1],
                      batch_size=sizes.resume_batch, steps=sizes.resume_steps, data_root=data_root))
    if compile_parts:
        parts += [part(f"overhead_compile_{t}_{s}", "overhead", "overhead_compile", teacher=t, student=s,
                       compile=True, **overhead) for t, s in sizes.overhead_pairs]
    return parts


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
    import inspect

    from hkdbench.benchmark.engine.step import setup_training

    return "compile" in inspect.signature(setup_training).parameters


def part_overhead(out: Path, device: Optional[str], teacher: str, student: str, methods: Sequence[str],
                  batch_size: int, img_size: int, warmup: int, repeats: int, precision: str, compile: bool) -> None:
    """``hkdbench overhead``'s measurement, method by method (the file rewritten after each one)."""
    import torch

    from hkdbench.benchmark.engine.evaluation import select_device
    from hkdbench.benchmark.core.config import OverheadConfig
    from hkdbench.benchmark.tools.overhead import BASELINES, add_ratios, measure_method

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
    ordered = list(BASELINES) + [m for m in methods if m not in BASELINES]
    for name in ordered:
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
                batch_size: int, steps: int, repeats: int, data_root: Optional[str]) -> None:
    from hkdbench.benchmark.tools.cohort_speed import measure_pair, pair_setting

    with tempfile.TemporaryDirectory(prefix="gpu_check_cohort_") as work:
        result = measure_pair(pair_setting(teacher, student, batch_size), methods, steps, repeats, Path(work),
                              device, data_root)
    _write_json(out, result)


TIME_KEYS = ("epoch_time_s", "images_per_s")


def part_resume(out: Path, device: Optional[str], teacher: str, student: str, batch_size: int, steps: int,
                data_root: Optional[str], method: str = "kd") -> None:
    """The run straight through, and stopped mid-way through its second epoch then resumed, compared."""
    import torch

    from hkdbench.benchmark.tools.cohort_speed import pair_setting, run_configs, save_random_teacher
    from hkdbench.benchmark.engine.trainer import train

    setting = pair_setting(teacher, student, batch_size)
    stop_after = steps + steps // 2 + 1  # steps done when the stop arrives: mid-way through epoch 2
    with tempfile.TemporaryDirectory(prefix="gpu_check_resume_") as work:
        work_dir = Path(work)
        checkpoint = save_random_teacher(setting, work_dir)
        cfg = run_configs(setting, checkpoint, [method], steps, data_root, extra=["train.epochs=2"])[0]
        common = dict(device=device, progress=False, echo=False)
        straight = train(cfg, runs_dir=str(work_dir / "straight"), **common)
        calls = {"n": 0}

        def stop_requested() -> bool:
            calls["n"] += 1
            return calls["n"] >= stop_after

        stopped = train(cfg, runs_dir=str(work_dir / "stopped"), should_stop=stop_requested, **common)
        saved = torch.load(stopped.run_dir.checkpoint_file, map_location="cpu", weights_only=False)
        resumed = train(cfg, runs_dir=str(work_dir / "stopped"), resume=True, **common)
        body = {"pair": f"{teacher} -> {student}", "method": method, "img_size": setting.img_size,
                "batch_size": batch_size, "steps_per_epoch": steps, "epochs": 2, "device": straight.summary["device"],
                "straight": straight.status, "stopped": stopped.status, "resumed": resumed.status,
                "stopped_at": {"epoch": saved["epoch"] + 1, "step": saved["step"]}}
        body.update(compare_metrics(straight.run_dir.metrics(), resumed.run_dir.metrics()))
        body.update(compare_weights(torch.load(straight.run_dir.weights_file("last"), map_location="cpu"),
                                    torch.load(resumed.run_dir.weights_file("last"), map_location="cpu")))
    _write_json(out, body)


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


PARTS: Dict[str, Callable[..., None]] = {"env": part_env, "overhead": part_overhead, "cohort": part_cohort,
                                         "resume": part_resume}


# --------------------------------------------------------------------------------------------------------------
# Running the parts
# --------------------------------------------------------------------------------------------------------------

def run_part(part: Part, raw: Path, timeout_s: float) -> Dict[str, Any]:
    """The part in a child process (``--run-part``), killed at ``timeout_s``; its record for the summary."""
    out, log = raw / f"{part.name}.json", raw / f"{part.name}.log"
    spec = json.dumps({"kind": part.kind, "args": part.args, "out": str(out)})
    record: Dict[str, Any] = {"name": part.name, "kind": part.kind, "budget_s": round(timeout_s, 1),
                              "raw": out.name, "log": log.name}
    tic = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, "-m", "hkdbench.benchmark.tools.gpu_check", "--run-part", spec],
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = child.wait(timeout=timeout_s)
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


def _log_tail(log: Path, lines: int = 12) -> str:
    text = log.read_text(errors="replace").strip().splitlines()
    return "\n".join(text[-lines:])


def run_check(outdir: Path, sizes: Sizes, budget_s: float, device: Optional[str], data_root: Optional[str],
              compile_parts: bool, tiny: bool, install: Optional[str] = None) -> Dict[str, Any]:
    raw = outdir / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    parts = plan(sizes, device, data_root, compile_parts, scale=budget_s / sum(_planned_budget(sizes, compile_parts)))
    deadline = time.monotonic() + budget_s
    summary: Dict[str, Any] = {"tiny": tiny, "budget_s": budget_s, "device_requested": device, "install": install,
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sizes": dataclasses.asdict(sizes),
                               "parts": []}
    for part in parts:
        left = deadline - time.monotonic()
        if left < 5:
            record = {"name": part.name, "kind": part.kind, "status": "skipped", "error": "no time left in the budget"}
        else:
            print(f"gpu-check: {part.name} (budget {min(part.budget_s, left):.0f} s)", flush=True)
            record = run_part(part, raw, min(part.budget_s, left))
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


def _planned_budget(sizes: Sizes, compile_parts: bool) -> List[float]:
    b = sizes.budgets
    n = len(sizes.overhead_pairs)
    return [b["env"], n * b["overhead_eager"], len(sizes.cohort_pairs) * b["cohort"], b["resume"],
            n * b["overhead_compile"] if compile_parts else 0.0]


# --------------------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------------------

def write_summary(outdir: Path, summary: Dict[str, Any]) -> None:
    _write_json(outdir / "summary.json", summary)
    (outdir / "summary.md").write_text(summary_markdown(summary))


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
    lines += _overhead_markdown(summary["parts"]) + _cohort_markdown(summary["parts"]) + _resume_markdown(parts)
    return "\n".join(lines) + "\n"


def _overhead_markdown(parts: List[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    by_pair: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for p in parts:
        result = p.get("result")
        if p["kind"] == "overhead" and result:
            c = result["config"]
            mode = "compile" if c.get("compile") else "eager"
            by_pair.setdefault(f"{c['teacher']} -> {c['student']}, {c['img_size']} px, batch {c['batch_size']}, "
                               f"{c['precision']}, {c['device']}", {})[mode] = result["methods"]
    for pair, modes in by_pair.items():
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
    return ["", f"## Cohort against separate runs ({methods})", "", format_results(results)]


def _resume_markdown(parts: Dict[str, Dict[str, Any]]) -> List[str]:
    r = parts.get("resume", {}).get("result")
    if not r:
        return []
    metrics = "equal" if r["metrics_equal"] else f"differ: {r.get('metrics_max_abs_diff') or r.get('metrics_note')}"
    weights = ("equal bit for bit" if r["weights_equal"] else
               f"{r.get('weights_tensors_differing')} of {r.get('weights_tensors')} tensors differ, largest "
               f"absolute difference {r.get('weights_max_abs_diff')}")
    return ["", f"## Stop and resume: {r['method']} {r['pair']}", "",
            f"{r['epochs']} epochs of {r['steps_per_epoch']} steps on {r['device']}; stopped at epoch "
            f"{r['stopped_at']['epoch']}, step {r['stopped_at']['step']} ({r['stopped']}), resumed ({r['resumed']}). "
            f"Against the run trained straight through: metrics {metrics}; final weights {weights}."]


def _num(v, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

def _child(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        PARTS[spec["kind"]](Path(spec["out"]), **spec["args"])
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hkdbench.benchmark.tools.gpu_check",
                                description="the GPU check: overhead, cohort and resume measurements into OUTDIR")
    p.add_argument("outdir", nargs="?")
    p.add_argument("--tiny", action="store_true", help="toy sizes (*_mini models, 32 px, a few steps), for a CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for all the parts together")
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
