"""The offline demo: a CNN teacher distilled into a ViT student on Fashion-MNIST, on a CPU in minutes.

The teacher (resnet_mini) trains on the whole training set; the students (vit_mini) train on a 10k-image
subset, where a teacher's soft labels matter most, the three methods as one cohort (one data stream, one teacher
pass per step). Both hold out a tenth of their images (``data.val_split``): each run's compared epoch is chosen on
them, and the test set only measures it. Every run lives in the run store, so running the demo again reuses what
is finished and resumes what was cut off.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

from hkdbench.benchmark.recipes.resolve import resolve_run_config
from hkdbench.benchmark.engine.trainer import train_cohort

TEACHER, STUDENT, METHODS = "resnet_mini", "vit_mini", ("none", "kd", "fitnet")
TEACHER_SETTINGS = ["train.epochs=3"]
# a tenth of the training images held out: the kept (and compared) epoch is chosen on them, not on the test set;
# the teacher run inherits the split, so it never trains on them either
STUDENT_SETTINGS = ["train.epochs=4", "data.train_subset=10000", "data.val_split=0.1"]
QUICK_TEACHER = ["train.epochs=1", "data.train_subset=1024"]
QUICK_STUDENT = ["train.epochs=1", "data.train_subset=512", "data.val_split=0.1"]


def demo_configs(quick: bool = False):
    teacher_settings = QUICK_TEACHER if quick else TEACHER_SETTINGS
    student_settings = QUICK_STUDENT if quick else STUDENT_SETTINGS
    return [resolve_run_config(kind="student", student=STUDENT, teacher=TEACHER, method=m, recipe="demo",
                               overrides=student_settings, teacher_overrides=teacher_settings) for m in METHODS]


def run_demo(runs_dir: Optional[str] = None, device: Optional[str] = None, quick: bool = False) -> int:
    start = time.time()
    results = train_cohort(demo_configs(quick), runs_dir=runs_dir, resume=True, device=device)
    unfinished = [f"{r.run_dir.path.name}: {r.status}" for r in results if r.status != "done"]
    if unfinished:
        print("not finished: " + "; ".join(unfinished))
        return 3
    print()
    rows = [r.summary for r in results]
    print(format_table(rows))
    if note := weak_teacher_note(rows, quick):
        print("\n" + note)
    print(f"\ntotal wall time {time.time() - start:.0f} s; runs in {results[0].run_dir.path.parent}")
    return 0


PAPERS_COLUMN = " best top-1 (test-selected, the papers') |"


def headline_top1(row: Dict) -> float:
    """The test top-1 a run is compared by: at its validation-selected epoch (data.val_split), else at its best
    test epoch (the papers' convention)."""
    return row.get("selected_top1", row["best_top1"])


def format_table(rows: List[Dict]) -> str:
    teacher_top1 = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None), None)
    base = next((headline_top1(r) for r in rows if r["method"] == "none"), None)
    validated = all("selected_top1" in r for r in rows)
    headline = "top-1 at the val-selected epoch" if validated else "best top-1"
    lines = [f"Fashion-MNIST test top-1 (%), teacher {TEACHER} (cnn) -> student {STUDENT} (vit)"
             + (f"; teacher top-1 {teacher_top1:.2f}" if teacher_top1 is not None else ""),
             "",
             f"| method | {headline} | last top-1 |{PAPERS_COLUMN if validated else ''}"
             " gain over student alone | train time (s) |",
             "|---|---:|---:|" + ("---:|" if validated else "") + "---:|---:|"]
    for r in rows:
        gain = f"{headline_top1(r) - base:+.2f}" if base is not None and r["method"] != "none" else "-"
        papers = f" {r['best_top1']:.2f} |" if validated else ""
        lines.append(f"| {r['method']} | {headline_top1(r):.2f} | {r['last_top1']:.2f} |{papers} {gain} | "
                     f"{r['train_time_s']:.0f} |")
    return "\n".join(lines)


def weak_teacher_note(rows: List[Dict], quick: bool = False) -> Optional[str]:
    """A word when the teacher scores below a student: a "gain" then is not a better model's knowledge passed on
    (the regulariser of soft labels at best, noise at worst)."""
    teacher_top1 = next((r["teacher_top1"] for r in rows if r.get("teacher_top1") is not None), None)
    best = max(rows, key=headline_top1)
    if teacher_top1 is None or teacher_top1 >= headline_top1(best):
        return None
    why = ("--quick trains the teacher for 1 epoch on 1024 images; `hkdbench demo` without --quick trains it "
           "properly" if quick else "a longer teacher run (teacher.train.epochs) would make it the stronger model")
    return (f"Note: the teacher ({teacher_top1:.2f} % top-1) is worse than the student {best['method']} "
            f"({headline_top1(best):.2f} %), so a gain over the student alone here is not knowledge from a better "
            f"model. {why[0].upper() + why[1:]}.")
