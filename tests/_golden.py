"""Golden runs: a tiny fixed run per built-in method, and the pipeline's own runs (teachers and students alone on
the demo recipe and on a paper recipe), whose numbers are pinned in ``tests/golden/runs.json`` together with the
versions that made them (``PIPELINE_VERSION``, each method's ``version``).

They hold those versions honest: a change that alters a run's numbers fails its golden until the version is bumped
(the changed computation then names new runs) and the goldens are recorded again with
``.venv/bin/python scripts/record_goldens.py``; a refactor that changes no number passes and keeps every run hash.
The tolerance is far above the float rounding of another CPU or thread count (``scripts/record_goldens.py --check``
measures it) and far below what a changed computation moves.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from hkdbench.benchmark.core.config import PIPELINE_VERSION
from hkdbench.benchmark.engine.trainer import train
from hkdbench.benchmark.recipes.resolve import resolve_run_config, teacher_run_config
from hkdbench.benchmark.core.store import RunDir
from hkdbench.methods import get_method, list_methods

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "runs.json"
# Tolerances: another thread count's rounding (scripts/record_goldens.py --compare at OMP_NUM_THREADS=2) moved the
# logged numbers by up to 5.4e-5 and the weights' sums by up to 2.8e-8, relative; a changed loss moves the logged
# numbers by far more than 1e-3 (tests/test_golden.py). Terms near zero (PAT's regulariser, ~1e-8) fall under ATOL.
RTOL, WEIGHTS_RTOL, ATOL = 1e-3, 1e-5, 1e-6
TEACHER, STUDENT = "resnet_mini", "vit_mini"  # a CNN -> ViT pair every method supports
# 2 epochs of 2 steps: the schedule moves, evaluation runs twice (the demo recipe: its own pipeline); a small lr
# keeps AdamW from amplifying float rounding (a near-zero gradient's update is +-lr whatever its size)
TINY = ["data.train_subset=64", "data.eval_subset=64", "data.batch_size=32", "data.img_size=16", "train.epochs=2",
        "optim.lr=2e-4"]
# the paper recipes' pipeline (RandAugment, colour jitter, random erasing, mixup/cutmix, AdamW with warm-up and
# clipping, label smoothing) at a size a CPU test affords
PAPER = ["data.img_size=32"]
PAPER_RECIPE = "cifar-vit"


def builtin_methods() -> List[str]:
    return [name for name, cls in list_methods().items() if cls.__module__.startswith("hkdbench.methods.")]


def _student(method: str, recipe: str = "demo", extra=()):
    overrides = TINY + list(extra)
    teacher = TEACHER if get_method(method).uses_teacher else None
    return resolve_run_config(kind="student", student=STUDENT, teacher=teacher, method=method, recipe=recipe,
                              overrides=overrides, teacher_overrides=overrides)


def measure(run_dir: RunDir) -> Dict[str, Any]:
    """A run's numbers: every loss term and the eval loss and top-1 per epoch, and the sums of the last weights
    (|w| and w^2 over every floating tensor)."""
    records = run_dir.metrics()
    keys = sorted(k for k in records[0] if k.startswith("loss/") or k in ("eval_loss", "top1"))
    weights = torch.load(run_dir.weights_file("last"), map_location="cpu", weights_only=True)
    floats = [w.double() for w in weights.values() if w.is_floating_point()]
    return {"epochs": {k: [r[k] for r in records] for k in keys},
            "weights": [sum(float(w.abs().sum()) for w in floats), sum(float((w * w).sum()) for w in floats)]}


def run_golden(name: str, runs_dir: Path) -> Dict[str, Any]:
    """Trains golden run ``name`` in ``runs_dir`` and returns its numbers: a built-in method's student run (on the
    demo recipe; 'none' is the student alone), 'teacher' (the teacher run the methods distil from) or 'paper' (the
    student alone on a paper recipe's pipeline)."""
    if name == "teacher":
        cfg = teacher_run_config(_student("kd"))
    elif name == "paper":
        cfg = _student("none", PAPER_RECIPE, PAPER)
    else:
        cfg = _student(name)
    train(cfg, str(runs_dir))
    return measure(RunDir(Path(runs_dir) / cfg.run_name()))


PIPELINE_GOLDENS = ("teacher", "paper")


def golden_names() -> List[str]:
    return list(PIPELINE_GOLDENS) + builtin_methods()


def version_of(name: str) -> Dict[str, int]:
    """The versions a golden run's numbers stand for."""
    if name in PIPELINE_GOLDENS:
        return {"pipeline": PIPELINE_VERSION}
    return {"pipeline": PIPELINE_VERSION, "method": get_method(name).version}


def load() -> Dict[str, Any]:
    return json.loads(GOLDEN_FILE.read_text())


def differences(expected: Dict[str, Any], measured: Dict[str, Any]) -> List[str]:
    """What differs beyond the tolerance, one line each (empty: the same computation)."""
    out = []
    exp_terms, got_terms = expected["epochs"], measured["epochs"]
    if sorted(exp_terms) != sorted(got_terms):
        out.append(f"logged terms {sorted(got_terms)}, golden {sorted(exp_terms)}")
    for key in sorted(set(exp_terms) & set(got_terms)):
        out += [f"{key} epoch {i + 1}: {g!r}, golden {e!r}" for i, (e, g) in enumerate(zip(exp_terms[key],
                                                                                         got_terms[key]))
                if not math.isclose(g, e, rel_tol=RTOL, abs_tol=ATOL)]
    for what, e, g in zip(("sum |w|", "sum w^2"), expected["weights"], measured["weights"]):
        if not math.isclose(g, e, rel_tol=WEIGHTS_RTOL, abs_tol=ATOL):
            out.append(f"last weights' {what}: {g!r}, golden {e!r}")
    return out


def stale_version(name: str, entry: Optional[Dict[str, Any]]) -> Optional[str]:
    """Why a golden cannot be compared: missing, or recorded at other versions than the code's."""
    if entry is None:
        return f"{name} has no golden run: record it (python scripts/record_goldens.py)"
    if entry["versions"] != version_of(name):
        return (f"{name}'s golden was recorded at versions {entry['versions']}, the code is at {version_of(name)}: "
                "record the goldens again (python scripts/record_goldens.py)")
    return None
