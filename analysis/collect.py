"""Collect the run store into tidy tables (pandas), from the stored files only.

* :func:`collect_runs`: one row per run (training runs of kind ``student`` / ``teacher`` and measurement runs of
  kind ``overhead``): identity (method, teacher, student, families, dataset, recipe, seed), results (best / last
  top-1, top-5, teacher top-1, epochs, parameters, time), overhead columns, probe summaries and provenance (run
  hash, git sha, device, versions from ``env.json``), plus ``status`` ('done', 'failed', 'unfinished', or
  'damaged': DONE but its summary unreadable). A damaged file is warned about, naming it, never read as empty.
* :func:`collect_epochs`: one row per (run, epoch) of ``metrics.jsonl``, with the run's identity columns (for
  convergence and gradient-conflict figures), without the student alone's ``cka@<teacher run>/...`` probes.
* :func:`collect_steps`: one row per (run, logged step) of ``steps.jsonl`` (every ``train.log_interval`` steps: the
  step's loss terms, lr, images/s), with the same identity columns (for the training-loss curves).
* :func:`collect_cka`: one row per (run, epoch, kernel, teacher stage, student stage) of every CKA probe, with the
  teacher run it was measured against (for the CKA figures): a distilled run's ``cka/<kernel>/t{i}_s{j}`` against its
  own teacher, a student-alone run's ``cka@<teacher run>/<kernel>/t{i}_s{j}`` against that named teacher run.

``setting`` is a short hash of the run's shared training setting (data, optimiser and schedule, without the seed,
the models, the method, the probe cadences and the teacher runs probed): runs with the same setting are comparable,
and a method's gain is taken over the student-alone run (method ``none``) of the same student and setting. The hash
only tells settings apart; :func:`label_runs` says in words what sets runs apart, in two columns that every table
and figure groups by:

* ``setting_label``: the setting's fields whose values differ between the settings of the store's runs of the same
  kind, dataset and recipe (``data.train_subset=256``), without those a table's title names (dataset, recipe,
  epochs); empty where nothing else differs.
* ``method_label``: the method with the settings that set its runs apart (:mod:`.order`): its hyperparameters away
  from the method's defaults (``method_settings`` of config.json: ``kd[temperature=4]``), and the teacher's training
  fields that differ between the runs of one table with the same teacher model (``kd[teacher: train.epochs=7]``;
  those alone are ``teacher_label``, ``train.epochs=7``).
  A run stored before ``method_settings`` existed is labelled by the plain method, plus, where other runs of that
  label in its table have other hyperparameters, the ones that differ (``kd[temperature=1]``): never pooled with them.
  Runs of one label made by other code (``method_code`` of config.json, the ``pipeline`` version of env.json: an
  edited plugin, another version) get the code that differs too (``logit_mse[weight=2, code=src-1a2b3c4d5e6f]``).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
import pandas as pd

from hkdbench.benchmark.core.store import (CONFLICT_COSINE, CONFLICT_FRACTION, NAMED_CKA, OVERHEAD_KIND, STEP_KEY,
                                          DamagedRunFileError, RunDir, RunStore, describe_run, parse_cka_key,
                                          teacher_model_from_name)

from .order import method_label

ID_COLUMNS = ["run", "kind", "status", "method", "method_label", "method_settings", "teacher", "teacher_label",
              "student", "teacher_family", "student_family", "dataset", "recipe", "setting", "setting_label", "seed",
              "epochs"]
# One table per setting: a table's runs share these; its title names all but the hash (for which setting_label speaks)
SETTING_KEYS = ["dataset", "recipe", "epochs", "setting"]
# selected_top1 / selected_epoch: test top-1 at the epoch whose validation top-1 is best (runs with data.val_split);
# best_* / last_* are the accuracies of the weights the run keeps (best_weights / last_weights in its directory);
# teacher_top1 is that of the teacher weights the run loaded (teacher_weights: best, last or checkpoint).
RESULT_COLUMNS = ["selected_top1", "selected_epoch",
                  "best_top1", "best_epoch", "last_top1", "last_epoch", "best_top5", "last_top5", "best_weights",
                  "last_weights", "teacher_top1", "teacher_weights", "teacher_run", "ema_best_top1",
                  "ema_best_epoch", "ema_last_top1", "student_params", "method_extra_params", "train_time_s",
                  "images_per_s", "global_batch", "pipeline", "cohort_size"]
OVERHEAD_COLUMNS = ["overhead_teacher", "batch_size", "img_size", "precision", "step_time_ms", "peak_memory_mb",
                    "train_gflops_per_image", "extra_params", "teacher_params", "train_params_vs_none",
                    "train_params_vs_kd"] + [f"{k}_vs_{b}" for b in ("none", "kd") for k in
                                             ("step_time_ms", "images_per_s", "peak_memory_mb",
                                              "train_gflops_per_image")]
PROBE_COLUMNS = ["conflict_cosine_mean", "conflict_fraction_mean", "cka_diag_last"]
PROVENANCE_COLUMNS = ["hash", "device", "gpu", "cpu", "cpu_count", "cpu_threads", "git_sha", "hkdbench", "torch",
                      "timm", "python", "host", "world_size", "started", "finished", "failure", "path"]

INT_COLUMNS = ["seed", "epochs", "selected_epoch",
               "best_epoch", "last_epoch", "ema_best_epoch", "student_params", "method_extra_params",
               "global_batch", "batch_size", "img_size", "num_classes", "extra_params", "teacher_params", "warmup",
               "repeats", "world_size", "cpu_count", "cpu_threads"]

# Config keys that do not change a result and so do not split a setting.
# probe_teachers (the teacher runs a student alone is probed against) too: else the probed student alone would stand
# in a setting of its own, apart from the distilled runs it is the baseline of.
_NOT_SETTING = {("train", "seed"), ("train", "probe_every"), ("train", "probe_images"), ("train", "probe_kernel"),
                ("train", "probe_teachers"), ("train", "conflict_every"), ("train", "eval_every"), ("data", "workers"),
                ("data", "root"), ("data", "download")}


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _setting_body(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    if not all(k in config for k in ("data", "optim", "train")):
        return None
    body = {section: {k: v for k, v in (config.get(section) or {}).items() if (section, k) not in _NOT_SETTING}
            for section in ("data", "optim", "train")}
    body["recipe"] = config.get("recipe")
    return body


def setting_of(config: Dict[str, Any]) -> Optional[str]:
    """Hash of the shared training setting of a training run's config (None for other kinds)."""
    body = _setting_body(config)
    return None if body is None else _short_hash(body)


def _text(value: Any) -> str:
    """One spelling of a value in a label: 4.0 as 4 (as ``method_settings`` writes it), strings bare, else JSON."""
    def plain(v):
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    value = plain(value)
    return value if isinstance(value, str) else json.dumps(value)


UNKNOWN = "<unknown>"  # a label input not recorded yet (a run not started): never sets a run apart


def _items(mapping: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """A nested mapping as ``{dotted key: value text}``."""
    out: Dict[str, str] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = _text(value)
    return out


def _teacher_items(config: Dict[str, Any]) -> Dict[str, str]:
    """How a distilled run's teacher was made, besides its model: its weights (which, from where), the teacher run's
    recipe and its overrides (``train.epochs=7``)."""
    teacher = config.get("teacher")
    if not isinstance(teacher, dict):  # no teacher, or an overhead record (the teacher's name only)
        return {}
    items = {k: _text(v) for k, v in teacher.items() if k != "name" and v not in (None, False)}
    if config.get("teacher_recipe"):
        items["recipe"] = str(config["teacher_recipe"])
    for override in config.get("teacher_overrides") or []:
        key, _, value = str(override).partition("=")
        items[key] = value
    return items


def _method_settings(config: Dict[str, Any]) -> Optional[List[str]]:
    # Runs stored before config.json had the key: which hyperparameters are the method's defaults is the registry's
    # knowledge, and the analysis reads the store only, so such runs are labelled by the plain method (and by what
    # differs from the other runs of their label, see label_runs).
    settings = config.get("method_settings")
    return None if settings is None else [str(s) for s in settings]


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """A run directory's epoch records, through the store's reader (a torn line is warned about, not dropped
    silently)."""
    return RunDir(path).metrics()


def _finite(values: Iterable) -> List[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _probe_summary(metrics: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    cos = _finite(r.get(CONFLICT_COSINE) for r in metrics)
    frac = _finite(r.get(CONFLICT_FRACTION) for r in metrics)
    out["conflict_cosine_mean"] = sum(cos) / len(cos) if cos else None
    out["conflict_fraction_mean"] = sum(frac) / len(frac) if frac else None
    last_cka = next((own for own in map(_own_cka, reversed(metrics)) if own), None)
    if last_cka is not None:
        diag = _finite(v for k, v in last_cka.items() if k.teacher_stage == k.student_stage)
        out["cka_diag_last"] = sum(diag) / len(diag) if diag else None
    return out


def _own_cka(record: Dict[str, Any]) -> Dict[Any, Any]:
    """An epoch record's CKA values against the run's own teacher, by their parsed key."""
    keys = {k: parse_cka_key(k) for k in record}
    return {key: record[k] for k, key in keys.items() if key is not None and key.teacher_run is None}


# a DONE run whose summary.json cannot be read: status 'damaged', in no table
_NO_RESULT = ("the run is DONE but its result is lost, so it is in no table: put back a good copy, or train it again "
              "with --restart")


def _read_object(read: Callable[[], Dict[str, Any]], path: Path, consequence: str,
                 check: Callable[[Dict[str, Any]], str] = lambda body: "") -> Optional[Dict[str, Any]]:
    """A record of a run, by the store's reader ``read`` of the file ``path``; None when the file is missing or, with
    a warning naming it and saying what that means for the run (``consequence``), damaged: not JSON, not an object,
    unreadable, or what ``check`` finds wrong in it."""
    if not path.exists():
        return None
    try:
        body = read()
    except DamagedRunFileError as err:
        why = err.why
    except OSError as err:
        why = f"unreadable: {err.strerror}"
    else:
        why = check(body)
    if not why:
        return body
    warnings.warn(f"{path} is damaged ({why}); {consequence}", stacklevel=3)
    return None


_NAMES = ["kind", "method", "teacher", "student", "dataset", "recipe", "teacher_family", "student_family"]
_NUMBERS = ["selected_top1", "selected_epoch",
            "best_top1", "last_top1", "best_top5", "last_top5", "teacher_top1", "best_epoch", "last_epoch", "seed",
            "epochs", "train_time_s"]


def _summary_problem(summary: Dict[str, Any]) -> str:
    """A summary field of the wrong type ('' when none): the tables group by the names and average the numbers."""
    for key in _NAMES:
        if summary.get(key) is not None and not isinstance(summary[key], str):
            return f"its {key} is {summary[key]!r}, not a name"
    for key in _NUMBERS:
        value = summary.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"its {key} is {value!r}, not a number"
    return ""


def run_row(path: Path, root: Optional[Path] = None) -> Dict[str, Any]:
    """The tidy row of one run directory."""
    path = Path(path)
    rd = RunDir(path)
    config = _read_object(rd.config_record, rd.config_file, "the run is left out: move its directory away, or put "
                          "back a good copy")
    if config is None:
        return {"run": path.name}  # no kind: not a row
    env = _read_object(rd.env, rd.env_file, "its hardware and versions are unknown") or {}
    done = rd.is_done
    summary = _read_object(rd.summary, rd.summary_file, _NO_RESULT, _summary_problem) if done else None
    failed = _read_object(rd.failure, rd.failed_file, "its reason is unknown") if rd.is_failed else None
    row: Dict[str, Any] = {"run": path.name, **describe_run(config)}
    row["status"] = ("damaged" if done and summary is None else "done" if done
                     else "failed" if rd.is_failed else "unfinished")
    if summary:
        row.update(summary)
    row["setting"] = setting_of(config)
    settings = _method_settings(config)
    row["method_settings"] = None if settings is None else ", ".join(settings)
    # what label_runs compares between runs, dropped after it
    row.update({"_settings": settings or [], "_setting": _items(_setting_body(config) or {}),
                "_teacher": _teacher_items(config), "_method_cfg": _items(config.get("method_cfg") or {}),
                "_code": _items({"code": config.get("method_code"),
                                 # a run not started yet (no env.json) has no pipeline version: unknown, not another
                                 "pipeline": env.get("pipeline") if rd.env_file.exists() else UNKNOWN})})
    row.update({"gpu": env.get("gpu"), "cpu": env.get("cpu"), "cpu_count": env.get("cpu_count"),
                "cpu_threads": env.get("cpu_threads"), "git_sha": env.get("git_sha"), "hkdbench": env.get("hkdbench"),
                "torch": env.get("torch"), "timm": env.get("timm"), "python": env.get("python"),
                "host": env.get("host"), "world_size": env.get("world_size"), "started": env.get("time")})
    row.setdefault("device", env.get("device"))
    if rd.is_failed:
        row["failure"] = failed.get("reason") if failed is not None else "unknown (its FAILED record is damaged)"
    if row.get("kind") != OVERHEAD_KIND:
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


# the setting fields a table's title names (SETTING_KEYS): left out of setting_label
_TITLED = {"data.dataset", "recipe", "train.epochs"}
_LABEL_INPUTS = ["_settings", "_setting", "_teacher", "_method_cfg", "_code"]


def _apart(df: pd.DataFrame, keys: List[str], column: str, absent: Optional[str] = None) -> pd.Series:
    """Per row, the ``key=value`` items of its ``column`` (a dict of value texts) whose key has not one value in every
    row of its group (``keys``): what sets the row apart within the group. A key a row lacks is written with the
    text ``absent``, or left out of that row's items where ``absent`` is None. A value ``UNKNOWN`` neither differs
    from the others nor joins its row's items."""
    out = pd.Series([[] for _ in range(len(df))], index=df.index, dtype=object)
    for idx in keyed(df, keys).groupby(keys).groups.values():
        dicts = df.loc[idx, column]
        names = sorted({k for d in dicts for k in d})
        differ = [k for k in names if len({d.get(k) for d in dicts} - {UNKNOWN}) > 1]
        for i, d in dicts.items():
            out.at[i] = [f"{k}={d.get(k, absent)}" for k in differ
                         if (k in d or absent is not None) and d.get(k) != UNKNOWN]
    return out


def label_runs(df: pd.DataFrame) -> pd.DataFrame:
    """``setting_label`` and ``method_label`` (see the module docstring) from the columns run_row leaves for them,
    which are then dropped."""
    df = df.copy()
    df["setting_label"] = _setting_labels(df)
    teacher = _apart(df, ["kind"] + SETTING_KEYS + ["teacher"], "_teacher")
    df["teacher_label"] = [", ".join(items) for items in teacher]
    df["method_label"] = _method_labels(df, teacher)
    return df.drop(columns=_LABEL_INPUTS)


def _setting_labels(df: pd.DataFrame) -> List[str]:
    untitled = pd.Series([{k: v for k, v in d.items() if k not in _TITLED} for d in df["_setting"]], index=df.index,
                         dtype=object)
    apart = _apart(df.assign(_setting=untitled), ["kind", "dataset", "recipe"], "_setting", absent="(not recorded)")
    return [", ".join(items) for items in apart]


def _method_labels(df: pd.DataFrame, teacher: pd.Series) -> List[str]:
    table = ["kind"] + SETTING_KEYS
    first = _labels(df, df["_settings"], teacher)
    # a run stored before method_settings cannot say which of its hyperparameters are not the defaults: where its label
    # would join runs of other hyperparameters, the ones that differ among them join its label
    extra = _apart(df.assign(_label=first), table + ["_label"], "_method_cfg")
    settings = pd.Series([list(e) if old else list(s) for s, e, old in
                          zip(df["_settings"], extra, df["method_settings"].isna())], index=df.index, dtype=object)
    # runs of one label made by other code (an edited plugin, another method or pipeline version) computed other
    # things: the code that differs joins their labels (logit_mse[code=src-1a2b...])
    code = _apart(df.assign(_label=_labels(df, settings, teacher)), table + ["_label"], "_code")
    return list(_labels(df, pd.Series([s + c for s, c in zip(settings, code)], index=df.index, dtype=object),
                        teacher))


def _labels(df: pd.DataFrame, settings: pd.Series, teacher: pd.Series) -> pd.Series:
    return pd.Series([method_label(m, s, t) for m, s, t in zip(df["method"], settings, teacher)], index=df.index,
                     dtype=object)


def collect_runs(runs_dir, include_unfinished: bool = True) -> pd.DataFrame:
    """One row per run of the store at ``runs_dir`` (see the module docstring)."""
    root = Path(runs_dir)
    rows = [r for r in (run_row(rd.path, root) for rd in RunStore(root).all_runs()) if r.get("kind")]
    df = pd.DataFrame(rows, columns=None if rows else ID_COLUMNS + _LABEL_INPUTS)
    df = label_runs(df)
    for col in ID_COLUMNS + RESULT_COLUMNS:
        if col not in df.columns:
            df[col] = None
    for col in INT_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce").round().astype("Int64")
    if not include_unfinished:
        df = df[df["status"] == "done"]
    df = _order(df, [ID_COLUMNS, RESULT_COLUMNS, OVERHEAD_COLUMNS, PROBE_COLUMNS, PROVENANCE_COLUMNS])
    return df.sort_values(["kind", "dataset", "teacher", "student", "method", "method_label", "seed"],
                          na_position="first",
                          key=lambda s: s.astype(str)).reset_index(drop=True)


EPOCH_ID = ["run", "kind", "method", "method_label", "teacher", "student", "teacher_family", "student_family",
            "dataset", "recipe", "setting", "setting_label", "seed"]


def _run_records(runs_dir, runs: Optional[pd.DataFrame], read: Callable[[RunDir], List[Dict[str, Any]]],
                 position: str, file_of: Callable[[RunDir], Path]) -> pd.DataFrame:
    """One row per record ``read`` returns of every finished training run, every key kept, the run's identity
    (EPOCH_ID) in front, sorted by run and ``position`` (the record's epoch or step)."""
    root = Path(runs_dir)
    runs = collect_runs(root) if runs is None else runs
    frames = []
    for _, r in runs.iterrows():
        if r["kind"] not in ("student", "teacher") or r["status"] != "done":
            continue
        records = read(RunDir(root / r["path"]))
        if not records:
            continue
        frame = pd.DataFrame(records)
        clash = [c for c in EPOCH_ID if c in frame.columns]  # the run's identity, never a metric: an edited file
        if clash:
            warnings.warn(f"{file_of(RunDir(root / r['path']))}: key(s) {', '.join(clash)} name the run, not a "
                          "metric (an edited file?); ignored", stacklevel=3)
        frame = frame.drop(columns=clash)
        for col in reversed(EPOCH_ID):
            frame.insert(0, col, r.get(col))
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=EPOCH_ID + [position])
    out = pd.concat(frames, ignore_index=True)
    if position not in out.columns:  # records without one (edited): kept, at none
        out[position] = None
    for col in ("seed", position):
        out[col] = pd.to_numeric(out[col], errors="coerce").round().astype("Int64")
    return out.sort_values(["run", position]).reset_index(drop=True)


def epoch_records(runs_dir, runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (run, epoch) of every finished training run's metrics.jsonl, every key kept."""
    return _run_records(runs_dir, runs, lambda rd: read_metrics(rd.path), "epoch", lambda rd: rd.metrics_file)


def collect_steps(runs_dir, runs: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """One row per (run, logged step) of every finished training run's steps.jsonl (STEP_KEY: the optimiser steps
    done), every key kept; empty for runs trained with ``train.log_interval=0`` or before the file existed."""
    return _run_records(runs_dir, runs, RunDir.steps, STEP_KEY, lambda rd: rd.steps_file)


def collect_epochs(runs_dir, runs: Optional[pd.DataFrame] = None,
                   records: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """:func:`epoch_records` without the ``cka@`` columns: one per (teacher run, kernel, stage pair) probed by the
    student alone, they would multiply the columns; :func:`collect_cka` holds them. ``records``: that frame, if
    already read."""
    records = epoch_records(runs_dir, runs) if records is None else records
    return records.drop(columns=[c for c in records.columns if str(c).startswith(NAMED_CKA)])


CKA_ID = ["run", "method", "method_label", "teacher", "teacher_run", "probe", "student", "dataset", "recipe",
          "setting", "setting_label", "seed"]
CKA_COLUMNS = CKA_ID + ["epoch", "kernel", "teacher_stage", "student_stage", "cka"]
OWN, NAMED = "own teacher", "named run"


def _teacher_model(probe_run: str, dataset: str, models: Dict[str, str]) -> Optional[str]:
    """The model a teacher run trained: from the store, else from its name (the store reads it), taking the teacher
    to have trained on the probing run's dataset."""
    return models[probe_run] if probe_run in models else teacher_model_from_name(probe_run, dataset)


def _name_probed_teachers(long: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``cka@`` keys take the named teacher run and its model; those whose model is unknown (not in the
    store, name not parsed) are left out, with a warning (a CKA against an unknown model would be mis-grouped)."""
    named = long["probe_run"].notna()
    if not named.any():
        return long
    teachers = runs[runs["kind"] == "teacher"]
    models = dict(zip(teachers["run"], teachers["student"]))
    pairs = long.loc[named, ["probe_run", "dataset"]].drop_duplicates()
    found = {(r, d): _teacher_model(r, d, models) for r, d in pairs.itertuples(index=False)}
    lost = sorted(r for (r, _), m in found.items() if m is None)
    if lost:
        warnings.warn(f"CKA probes against teacher run(s) {', '.join(lost)} left out: not in the store and the "
                      "model is not readable from the name (teacher_<model>_<dataset>_s<seed>_<hash>)", stacklevel=3)
    model = pd.Series([found.get((r, d)) for r, d in zip(long["probe_run"], long["dataset"])], index=long.index)
    long.loc[named, "teacher"] = model[named]
    long.loc[named, "teacher_run"] = long.loc[named, "probe_run"]
    return long[~named | model.notna()]


def cka_table(records: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The long CKA table (:data:`CKA_COLUMNS`) of an epoch frame's ``cka/`` and ``cka@`` columns; ``runs`` gives
    each run's teacher run and the models of the teacher runs. ``probe`` says against what: the run's own teacher
    (``teacher_run`` is empty for a teacher from a checkpoint) or a named teacher run."""
    keys = {c: key for c, key in ((c, parse_cka_key(str(c))) for c in records.columns) if key is not None}
    if records.empty or not keys:
        return pd.DataFrame(columns=CKA_COLUMNS)
    long = records[["run", "epoch"] + list(keys)].melt(id_vars=["run", "epoch"], var_name="key", value_name="cka")
    long["cka"] = pd.to_numeric(long["cka"], errors="coerce")
    long = long[np.isfinite(long["cka"].astype(float))]  # a key absent at an epoch, or a probe that failed
    parts = pd.DataFrame([(k.teacher_run, k.kernel, k.teacher_stage, k.student_stage) for k in keys.values()],
                         index=list(keys), columns=["probe_run", "kernel", "teacher_stage", "student_stage"])
    key = long.pop("key")
    long = long.join(parts, on=key)
    ids = runs.set_index("run")[[c for c in CKA_ID if c not in ("run", "probe")]]
    long = long.join(ids, on="run")
    long["probe"] = np.where(long["probe_run"].isna(), OWN, NAMED)
    long = _name_probed_teachers(long, runs)
    for col in ("teacher_stage", "student_stage"):
        long[col] = long[col].astype(int)
    long["seed"] = pd.to_numeric(long["seed"], errors="coerce").round().astype("Int64")
    long = long[CKA_COLUMNS].sort_values(["run", "epoch", "kernel", "teacher_run", "teacher_stage", "student_stage"],
                                         key=lambda s: s.astype(str) if s.dtype == object else s)
    return long.reset_index(drop=True)


def collect_cka(runs_dir, runs: Optional[pd.DataFrame] = None,
                records: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The long CKA table of the store (:func:`cka_table`); ``records``: :func:`epoch_records`, if already read
    (collect_epochs' frame would not do: it has no ``cka@`` columns)."""
    runs = collect_runs(runs_dir) if runs is None else runs
    return cka_table(epoch_records(runs_dir, runs) if records is None else records, runs)
