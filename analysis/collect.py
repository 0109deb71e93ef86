"""Collect the run store into tidy tables (pandas), from the stored files only.

* :func:`collect_runs`: one row per run (training runs of kind ``student`` / ``teacher`` and measurement runs of
  kind ``overhead``): identity (method, teacher, student, families, dataset, recipe, seed), results (best / last
  top-1, top-5, teacher top-1, epochs, parameters, time), overhead columns, probe summaries and provenance (run
  hash, git sha, device, versions from ``env.json``), plus ``status`` ('done', 'failed', 'unfinished').
* :func:`collect_epochs`: one row per (run, epoch) of ``metrics.jsonl``, with the run's identity columns (for
  convergence, CKA and gradient-conflict figures).

``setting`` is a short hash of the run's shared training setting (data, optimiser and schedule, without the seed,
the models, the method and the probe cadences): runs with the same setting are comparable, and a method's gain
is taken over the student-alone run (method ``none``) of the same student and setting.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import pandas as pd

from hkdbench.benchmark.store import CONFIG_FILE, RunDir, read_json_or_none

ID_COLUMNS = ["run", "kind", "status", "method", "teacher", "student", "teacher_family", "student_family",
              "dataset", "recipe", "setting", "method_variant", "seed", "epochs"]
# best_* / last_* are the accuracies of the weights the run keeps (best_weights / last_weights in its directory);
# teacher_top1 is that of the teacher weights the run loaded (teacher_weights: best, last or checkpoint).
RESULT_COLUMNS = ["best_top1", "best_epoch", "last_top1", "last_epoch", "best_top5", "last_top5", "best_weights",
                  "last_weights", "teacher_top1", "teacher_weights", "teacher_run", "ema_best_top1",
                  "ema_best_epoch", "ema_last_top1", "student_params", "method_extra_params", "train_time_s",
                  "images_per_s", "global_batch", "data_stream", "cohort_size"]
OVERHEAD_COLUMNS = ["overhead_teacher", "batch_size", "img_size", "precision", "step_time_ms", "peak_memory_mb",
                    "train_gflops_per_image", "extra_params", "teacher_params", "train_params_vs_none",
                    "train_params_vs_kd"] + [f"{k}_vs_{b}" for b in ("none", "kd") for k in
                                             ("step_time_ms", "images_per_s", "peak_memory_mb",
                                              "train_gflops_per_image")]
PROBE_COLUMNS = ["conflict_cosine_mean", "conflict_fraction_mean", "cka_diag_last"]
PROVENANCE_COLUMNS = ["hash", "device", "gpu", "cpu", "cpu_count", "cpu_threads", "git_sha", "hkdbench", "torch",
                      "timm", "python", "host", "world_size", "started", "finished", "failure", "path"]

INT_COLUMNS = ["seed", "epochs", "best_epoch", "last_epoch", "ema_best_epoch", "student_params", "method_extra_params",
               "global_batch", "batch_size", "img_size", "num_classes", "extra_params", "teacher_params", "warmup",
               "repeats", "world_size", "cpu_count", "cpu_threads"]

# Config keys that do not change a result and so do not split a setting.
_NOT_SETTING = {("train", "seed"), ("train", "probe_every"), ("train", "probe_images"), ("train", "probe_kernel"),
                ("train", "conflict_every"), ("train", "eval_every"), ("data", "workers"), ("data", "root"),
                ("data", "download")}


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def setting_of(config: Dict[str, Any]) -> Optional[str]:
    """Hash of the shared training setting of a training run's config (None for other kinds)."""
    if not all(k in config for k in ("data", "optim", "train")):
        return None
    body = {section: {k: v for k, v in (config.get(section) or {}).items() if (section, k) not in _NOT_SETTING}
            for section in ("data", "optim", "train")}
    body["recipe"] = config.get("recipe")
    return _short_hash(body)


def method_variant(config: Dict[str, Any]) -> Optional[str]:
    """Hash of the method's hyperparameters and of the teacher's training (what else makes two cells differ)."""
    if "method_cfg" not in config:
        return None
    return _short_hash({"method_cfg": config.get("method_cfg"), "teacher": config.get("teacher"),
                        "teacher_recipe": config.get("teacher_recipe"),
                        "teacher_overrides": config.get("teacher_overrides")})


def run_dirs(root: Path) -> List[Path]:
    """Every run directory (one holding config.json) under ``root``, at any depth, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run store {str(root)!r} does not exist")
    return sorted(p.parent for p in root.rglob(CONFIG_FILE) if not p.parent.name.startswith("."))


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """A run directory's epoch records, through the store's reader (a torn line is warned about, not dropped
    silently)."""
    return RunDir(path).metrics()


def _finite(values: Iterable) -> List[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _probe_summary(metrics: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    cos = _finite(r.get("conflict/cosine") for r in metrics)
    frac = _finite(r.get("conflict/fraction") for r in metrics)
    out["conflict_cosine_mean"] = sum(cos) / len(cos) if cos else None
    out["conflict_fraction_mean"] = sum(frac) / len(frac) if frac else None
    last_cka = next((r for r in reversed(metrics) if any(k.startswith("cka/") for k in r)), None)
    if last_cka is not None:
        diag = _finite(v for k, v in last_cka.items() if k.startswith("cka/")
                       and k.rsplit("/", 1)[1].split("_")[0][1:] == k.rsplit("/", 1)[1].split("_")[1][1:])
        out["cka_diag_last"] = sum(diag) / len(diag) if diag else None
    return out


def _identity_from_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Identity columns from config.json alone (for runs without a summary)."""
    if config.get("kind") == "overhead":
        return {k: config.get(k) for k in ("method", "student", "teacher", "seed")} | {"kind": "overhead"}
    teacher = config.get("teacher") or {}
    return {"kind": config.get("kind"), "method": config.get("method"),
            "teacher": teacher.get("name") if isinstance(teacher, dict) else None,
            "student": (config.get("student") or {}).get("name"), "dataset": (config.get("data") or {}).get("dataset"),
            "recipe": config.get("recipe"), "seed": (config.get("train") or {}).get("seed"),
            "epochs": (config.get("train") or {}).get("epochs")}


def run_row(path: Path, root: Optional[Path] = None) -> Dict[str, Any]:
    """The tidy row of one run directory."""
    path = Path(path)
    rd = RunDir(path)
    config = read_json_or_none(rd.config_file) or {}
    env = read_json_or_none(rd.env_file) or {}
    done = rd.is_done
    summary = read_json_or_none(rd.summary_file) if done else None
    failed = read_json_or_none(rd.failed_file) if rd.is_failed else None
    row: Dict[str, Any] = {"run": path.name, **_identity_from_config(config)}
    row["status"] = "done" if done else ("failed" if failed is not None else "unfinished")
    if summary:
        row.update(summary)
    row["setting"] = setting_of(config)
    row["method_variant"] = method_variant(config)
    row.update({"gpu": env.get("gpu"), "cpu": env.get("cpu"), "cpu_count": env.get("cpu_count"),
                "cpu_threads": env.get("cpu_threads"), "git_sha": env.get("git_sha"), "hkdbench": env.get("hkdbench"),
                "torch": env.get("torch"), "timm": env.get("timm"), "python": env.get("python"),
                "host": env.get("host"), "world_size": env.get("world_size"), "started": env.get("time")})
    row.setdefault("device", env.get("device"))
    if failed is not None:
        row["failure"] = failed.get("reason")
    if row.get("kind") != "overhead":
        row.update(_probe_summary(read_metrics(path)))
    row["path"] = str(path.relative_to(root)) if root is not None else str(path)
    return row


def keyed(df: pd.DataFrame, keys: List[str], missing: str = "-") -> pd.DataFrame:
    """A copy of ``df`` whose ``keys`` columns are plain objects with ``missing`` for NA (safe to group by)."""
    df = df.copy()
    for k in keys:
        if k not in df.columns:
            df[k] = missing
        col = df[k].astype(object)
        df[k] = col.where(col.notna(), missing)
    return df


def _order(df: pd.DataFrame, groups: List[List[str]]) -> pd.DataFrame:
    first = [c for g in groups for c in g if c in df.columns]
    rest = sorted(c for c in df.columns if c not in first)
    return df[first + rest]


def collect_runs(runs_dir, include_unfinished: bool = True) -> pd.DataFrame:
    """One row per run of the store at ``runs_dir`` (see the module docstring)."""
    root = Path(runs_dir)
    rows = [r for r in (run_row(p, root) for p in run_dirs(root)) if r.get("kind")]  # run directories only
    df = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS)
    for col in ID_COLUMNS + RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in INT_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    if not include_unfinished:
        df = df[df["status"] == "done"]
    df = _order(df, [ID_COLUMNS, RESULT_COLUMNS, OVERHEAD_COLUMNS, PROBE_COLUMNS, PROVENANCE_COLUMNS])
    return df.sort_values(["kind", "dataset", "teacher", "student", "method", "seed"], na_position="first",
                          key=lambda s: s.astype(str)).reset_index(drop=True)


EPOCH_ID = ["run", "kind", "method", "teacher", "student", "teacher_family", "student_family", "dataset", "recipe",
            "setting", "method_variant", "seed"]


def collect_epochs(runs_dir, runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (run, epoch) of every finished training run's metrics.jsonl."""
    root = Path(runs_dir)
    runs = collect_runs(root) if runs is None else runs
    frames = []
    for _, r in runs.iterrows():
        if r["kind"] not in ("student", "teacher") or r["status"] != "done":
            continue
        metrics = read_metrics(root / r["path"])
        if not metrics:
            continue
        frame = pd.DataFrame(metrics)
        for col in reversed(EPOCH_ID):
            frame.insert(0, col, r.get(col))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=EPOCH_ID + ["epoch"])
    out = pd.concat(frames, ignore_index=True)
    for col in ("seed", "epoch"):
        out[col] = pd.to_numeric(out[col], errors="coerce").round().astype("Int64")
    return out.sort_values(["run", "epoch"]).reset_index(drop=True)
