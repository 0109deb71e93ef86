"""``hkdbench runs``: the run store as a list in the terminal (or CSV/JSON), read through the analysis' collect (the
tidy row of each run) and the store's RunDir (a live run's state and its epoch records); torch-free."""
from __future__ import annotations

import contextlib
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pandas as pd

from hkdbench import TIME_FORMAT
from hkdbench.analysis.collect import collect_runs
from hkdbench.benchmark.core.store import RunDir

COLUMNS = ["method", "pair", "dataset", "setting", "seed", "status", "epoch", "last_top1", "best_top1", "age", "run"]
# collect's 'unfinished', told apart by the store: a process holds its lock, it has a checkpoint, or neither yet
STATUSES = ("done", "running", "partial", "pending", "failed", "damaged")
FILTERS = ("method", "teacher", "student", "status", "dataset")


def runs_table(runs_dir, filters: Optional[Dict[str, Sequence[str]]] = None) -> pd.DataFrame:
    """One row per training run of the store (teacher runs too), :data:`COLUMNS`, newest first; ``filters``: column ->
    the values kept (method, teacher, student, status, dataset)."""
    runs = collect_runs(runs_dir)
    runs = runs[runs["kind"] != "overhead"]
    rows = pd.DataFrame([_row(r, Path(runs_dir)) for r in runs.to_dict("records")],
                        columns=COLUMNS + ["_method", "_teacher", "_student", "_mtime"])
    for key, wanted in (filters or {}).items():
        if wanted:
            column = {"status": "status", "dataset": "dataset"}.get(key, f"_{key}")
            rows = rows[rows[column].isin(list(wanted))]
    return rows.sort_values("_mtime", ascending=False)[COLUMNS].reset_index(drop=True)


def _row(run: Dict[str, Any], root: Path) -> Dict[str, Any]:
    rd = RunDir(root / run["path"])
    status = rd.status() if run["status"] == "unfinished" else run["status"]
    records = [r for r in rd.metrics() if "top1" in r] if run["status"] != "damaged" else []
    teacher = run.get("teacher") if isinstance(run.get("teacher"), str) else None
    teacher_run = run["kind"] == "teacher"
    return {"method": "(teacher run)" if teacher_run else run.get("method_label") or run.get("method"),
            "pair": run["student"] if teacher_run else f"{teacher or '-'} -> {run['student']}",
            "dataset": run.get("dataset"), "setting": _setting(run), "seed": run.get("seed"), "status": status,
            "epoch": f"{records[-1]['epoch'] if records else 0}/{run.get('epochs')}",
            # a finished run's summary, else what its epoch records say so far
            "last_top1": _number(run.get("last_top1"), records[-1]["top1"] if records else None),
            "best_top1": _number(run.get("best_top1"), max(r["top1"] for r in records) if records else None),
            "age": _age(_last_change(rd, run)), "run": run["run"],
            # a teacher run is its model's: --teacher finds it with the runs distilled from it
            "_method": "teacher" if teacher_run else run["method"],
            "_teacher": run["student"] if teacher_run else teacher, "_student": None if teacher_run else run["student"],
            "_mtime": _last_change(rd, run)}


def _number(value: Any, fallback: Optional[float]) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and value == value else fallback


def _setting(run: Dict[str, Any]) -> str:
    label = run.get("setting_label")
    return f"{run.get('recipe')}" + (f" [{label}]" if isinstance(label, str) and label else "")


def _last_change(rd: RunDir, run: Dict[str, Any]) -> float:
    """When the run finished (its summary's time), else when it last wrote one of its records."""
    with contextlib.suppress(TypeError, ValueError):
        return datetime.strptime(run.get("finished"), TIME_FORMAT).timestamp()
    files = (rd.config_file, rd.metrics_file, rd.checkpoint_file, rd.summary_file, rd.failed_file, rd.done_file)
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def _age(mtime: float, now: Optional[float] = None) -> str:
    seconds = max(0.0, (time.time() if now is None else now) - mtime)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def format_runs(table: pd.DataFrame, fmt: str = "table") -> str:
    """The listing as an aligned text table (top-1 to two decimals, '-' where none yet), CSV or JSON records."""
    if fmt == "csv":
        return table.to_csv(index=False).rstrip("\n")
    if fmt == "json":
        return table.to_json(orient="records", indent=2)
    if table.empty:
        return "no runs"
    shown = table.drop(columns=["run"]).astype(object)
    for column in ("last_top1", "best_top1"):
        shown[column] = [f"{v:.2f}" if isinstance(v, float) and v == v else "-" for v in shown[column]]
    shown = shown.rename(columns={"last_top1": "last top-1", "best_top1": "best top-1 (test)"})
    texts = [[str(c) for c in shown.columns]] + [["-" if v is None else str(v) for v in row]
                                                  for row in shown.itertuples(index=False)]
    widths = [max(len(row[i]) for row in texts) for i in range(len(texts[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in texts)
