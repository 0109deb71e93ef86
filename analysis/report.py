"""``hkdbench report``: every table and figure regenerated from the run store into one folder, with an index.

    <out>/README.md          the index: tables inline, figures linked (PNG shown, PDF linked)
    <out>/runs.csv           the tidy table, one row per run
    <out>/epochs.csv         the per-epoch table (one row per run and epoch)
    <out>/steps.csv          the per-step table (one row per run and logged step: steps.jsonl)
    <out>/cka.csv            the CKA table (one row per run, epoch, kernel and teacher stage / student stage pair,
                             with the teacher run it was measured against)
    <out>/tables/*.md|tex|csv  comparison tables, and the published numbers beside their cells
                             (published_vs_ours_*: the shipped OFA-KD cells or --published FILE)
    <out>/figures/*.png|pdf  every figure of ``plots.FIGURES`` (gains, ranks, cost, overhead, CKA, conflict,
                             convergence, training loss per step)

Only the stored files of the runs are read (config.json, env.json, summary.json, metrics.jsonl, steps.jsonl,
DONE/FAILED).
"""
from __future__ import annotations

import os
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd

from hkdbench import TIME_FORMAT
from hkdbench.benchmark.core.errors import StoreError
from hkdbench.benchmark.core.store import (INVOKED_AT, INVOKED_COMMAND, INVOKED_EXECUTOR, SUBMITTED_AT, SUBMITTED_RUN,
                                          SWEEP_ID, SWEEP_INVOCATIONS, SWEEP_PRESET, RunStore)

from .collect import cka_table, collect_epochs, collect_runs, collect_steps, epoch_records, keyed
from .plots import FIGURES, all_plots
from .published import SHIPPED, published_cells
from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED
from .tables import (BEST, PRIMARY, TIE_RULE, comparison_tables, metric_words, published_markdown,
                     published_side_by_side)


STATISTICS_LINES = [
    "How to read them (`analysis/stats.py`; the reasons in the docs' *Read the report* page):", "",
    "- Accuracy: each table compares the top-1 of the epoch chosen on a validation split held out of the training "
    "set (`selected_top1`, runs with `data.val_split`) where every run of the table has one, else the last epoch's "
    "(`last_top1`); the table says which. The papers' convention, the best epoch chosen on the test set "
    "(`best_top1`), is optimistic by construction and shown only in its own section, labelled so.",
    "- Accuracy cells: mean ± sample std over seeds with the 95 % t interval of the mean; the seeds per cell are "
    "stated, a cell with one seed says so and has no interval.",
    "- Differences from the student alone (S) and from KD: seed by seed over the seeds both have, with a 95 % t "
    "interval and the p-value of the paired t test, Holm-corrected over the table's family of tests (every method in "
    "every pair against S; against KD its own family); `*` where the corrected p-value is below 0.05. A difference "
    "with fewer than 2 seeds, or the same on every seed (no spread), has no test and is never marked. Runs trained "
    "on the keyed data stream (every run with a pipeline version; the `pipeline` column of runs.csv) are paired by "
    "seed and batch: every method of a seed saw the same batches; each table says how its runs are paired.",
    f"- Bold: the method beats S under the corrected test (nothing else is bold). W/T/L: {TIE_RULE}.",
    f"- Ranks: within each pair by mean, 1 = best, S included, ties share their mean rank; averaged over the pairs "
    f"with every method, with a percentile bootstrap interval that draws pairs and seeds within them "
    f"({BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}). Friedman's test (and Iman and Davenport's F) asks "
    "whether the methods rank alike; only where F rejects, the Nemenyi critical difference says which orders are "
    "supported, drawn as a critical-difference diagram (Demsar 2006). The tables state no other order.",
    "- Columns, bars and series are method labels, computed once in `runs.csv` (`method_label`): the method at its "
    "defaults (`kd`), or with, in brackets, what sets its runs apart: its hyperparameters away from the method's "
    "defaults (`kd[temperature=4]`) and, after `teacher:`, how its teacher was trained where that differs within "
    "the table (`kd[teacher: train.epochs=7]`). Runs of different labels or settings are never averaged together; a "
    "table's title names the setting fields that differ from the other settings of its dataset and recipe.",
    "- Cost figures: the train step time (median ms) and the train GFLOPs per image that `hkdbench overhead` measured "
    "(only the pairs it measured), not a run's wall time, which depends on what else the machine ran and on the "
    "cohort it trained in; methods of equal cost are drawn a hair apart.", ""]


def tidy_tables(runs_dir) -> Dict[str, pd.DataFrame]:
    """runs, epochs, steps and cka of the store, each metrics.jsonl read once (a store without a readable run: see
    :func:`check_readable`)."""
    runs = check_readable(collect_runs(runs_dir), runs_dir)
    records = epoch_records(runs_dir, runs)
    return {"runs": runs, "epochs": collect_epochs(runs_dir, runs, records), "steps": collect_steps(runs_dir, runs),
            "cka": cka_table(records, runs)}


def check_readable(runs: pd.DataFrame, runs_dir) -> pd.DataFrame:
    """``runs`` (collect_runs' table), unless it is empty: then a StoreError that says why, raised before anything
    is written (every table and figure would be empty)."""
    if runs.empty:
        what = ("no run whose config.json can be read (see the warnings)" if RunStore(runs_dir).all_runs()
                else "no run directory")
        raise StoreError(f"run store {runs_dir} holds {what}: nothing to collect, tabulate or plot, and nothing was "
                         "written. Is --runs-dir right?")
    return runs


def write_tidy(runs_dir, out_dir, tables: Optional[Dict[str, pd.DataFrame]] = None) -> Dict[str, Path]:
    """Writes <out>/runs.csv, epochs.csv, steps.csv and cka.csv (``tables``: :func:`tidy_tables`, if already
    collected)."""
    tables = tidy_tables(runs_dir) if tables is None else tables
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.csv" for name in tables}
    for name, frame in tables.items():
        frame.to_csv(paths[name], index=False)
    return paths


def _damaged_note(runs: pd.DataFrame) -> str:
    damaged = runs.loc[runs["status"] == "damaged", "run"].tolist()
    return (f", {len(damaged)} damaged (DONE, but summary.json unreadable: in no table; {', '.join(damaged)})"
            if damaged else "")


def _clear(folder: Path, suffixes) -> None:
    for f in folder.glob("*"):
        if f.is_file() and f.suffix in suffixes:
            f.unlink()


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _hardware(row) -> str:
    if str(row.get("device", "")).startswith("cuda"):
        return f"{row.get('world_size') or 1} x {row.get('gpu') or 'CUDA GPU (model not recorded)'}"
    cpu = row.get("cpu")
    if not isinstance(cpu, str):
        return "CPU (model not recorded)"
    cores = f", {int(row['cpu_count'])} cores" if pd.notna(row.get("cpu_count")) else ""
    threads = f", {int(row['cpu_threads'])} thread(s) per run" if pd.notna(row.get("cpu_threads")) else ""
    return f"{cpu} CPU{cores}{threads}"


def _time(stamp) -> Optional[datetime]:
    try:
        return datetime.strptime(str(stamp), TIME_FORMAT)
    except ValueError:
        return None


def _finish_time(row) -> Tuple[Optional[datetime], bool]:
    """When a run finished, and whether that is exact (older runs lack ``finished``: start + training time)."""
    finished = _time(row.get("finished"))
    if finished is not None:
        return finished, True
    started, seconds = _time(row.get("started")), pd.to_numeric(row.get("train_time_s"), errors="coerce")
    if started is None or pd.isna(seconds):
        return None, False
    return started + timedelta(seconds=float(seconds)), False


def _duration(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def read_sweeps(runs_dir) -> List[Dict[str, Any]]:
    """The sweep manifests of a run store (``_sweeps/<id>/sweep.json``) with their submission records."""
    sweeps = []
    for sweep in RunStore(runs_dir).sweeps():
        try:
            sweeps.append({**sweep.manifest(), "submissions": sweep.submissions()})
        except StoreError as err:
            warnings.warn(f"{err.message()}; the report leaves the sweep out of its provenance", stacklevel=2)
    return sweeps


def sweep_lines(sweep: Dict[str, Any], runs: pd.DataFrame) -> List[str]:
    """How one sweep was run: its command lines, and the wall time from its first submission to the last
    finish of the runs it submitted."""
    preset = sweep.get(SWEEP_PRESET, {})
    line = f"- sweep `{sweep.get(SWEEP_ID)}`, preset `{preset.get('name')}`"
    line += f" ({preset['description']})" if preset.get("description") else ""
    commands = [i for i in sweep.get(SWEEP_INVOCATIONS, []) if isinstance(i, dict) and i.get(INVOKED_COMMAND)]
    if commands:
        line += ": " + "; ".join(f"`{i[INVOKED_COMMAND]}` ({i.get(INVOKED_EXECUTOR)}, {i.get(INVOKED_AT)})"
                                 for i in commands)
    submitted = {s[SUBMITTED_RUN] for s in sweep["submissions"] if isinstance(s.get(SUBMITTED_RUN), str)}
    mine = runs[runs["run"].isin(submitted) & (runs["status"] == "done")]
    starts = [t for t in (_time(s.get(SUBMITTED_AT)) for s in sweep["submissions"]) if t is not None]
    finishes = [_finish_time(r) for _, r in mine.iterrows()]
    ends = [t for t, _ in finishes if t is not None]
    if starts and ends and len(mine) == len(submitted):
        exact = "" if all(ok for _, ok in finishes) else " (some finish times estimated as start + training time)"
        line += (f". It trained {len(submitted)} runs from {min(starts):%Y-%m-%d %H:%M} to {max(ends):%H:%M %Z}: "
                 f"wall time {_duration((max(ends) - min(starts)).total_seconds())}{exact}.")
    elif submitted:
        line += f". It submitted {len(submitted)} runs, {len(mine)} of them done."
    return [line]


def overhead_lines(runs: pd.DataFrame) -> List[str]:
    """One line per overhead measurement: the command that repeats it (every setting is in the run's config)."""
    done = runs[(runs["kind"] == "overhead") & (runs["status"] == "done")]
    if done.empty:
        return []
    keys = ["overhead_teacher", "student", "batch_size", "img_size", "num_classes", "warmup", "repeats",
            "precision", "device"]
    lines = ["Overhead measurements:", ""]
    for values, g in keyed(done, keys).groupby(keys):
        k = dict(zip(keys, values))
        command = (f"hkdbench overhead --teacher {k['overhead_teacher']} --student {k['student']} --batch-size "
                   f"{k['batch_size']} --img-size {k['img_size']} --num-classes {k['num_classes']} --warmup "
                   f"{k['warmup']} --repeats {k['repeats']} --precision {k['precision']} --device {k['device']}")
        lines.append(f"- `{command}` ({len(g)} methods, {g['started'].min()}; {_hardware(g.iloc[0])})")
    return lines + [""]


def provenance_lines(runs_dir, runs: pd.DataFrame) -> List[str]:
    """Hardware, software, training time and, per sweep of the store, its command and wall time."""
    train = runs[(runs["status"] == "done") & runs["kind"].isin(["student", "teacher"])]
    if train.empty:
        return []
    lines = ["## Provenance", ""]
    hardware = train.apply(_hardware, axis=1).value_counts()
    lines += ["Hardware: " + "; ".join(f"{name} ({n} runs)" for name, n in hardware.items()) + ".", ""]
    hours = pd.to_numeric(train["train_time_s"], errors="coerce").sum() / 3600
    versions = sorted({f"torch {r.torch}, timm {r.timm}, python {r.python}" for r in train.itertuples()
                       if isinstance(r.torch, str)})
    shas = sorted({str(s) for s in train["git_sha"].dropna()})
    lines += [f"Software: {'; '.join(versions) or 'versions unknown'}; hkdbench git {', '.join(shas) or 'unknown'}.",
              "", f"Summed training time of the finished runs: {hours:.2f} h.", ""]
    sweeps = read_sweeps(runs_dir)
    if sweeps:
        lines += ["Sweeps in the store:", ""]
        for sweep in sweeps:
            lines += sweep_lines(sweep, runs)
        lines += [""]
    return lines + overhead_lines(runs)


def published_lines(table, cells, tables_dir: Path) -> List[str]:
    """The table's published numbers side by side (written as Markdown and CSV too); nothing when none match."""
    pub = published_side_by_side(table, cells)
    if pub is None:
        return []
    stem = f"published_vs_ours_{table.slug}"
    pub.to_csv(tables_dir / f"{stem}.csv", index=False)
    (tables_dir / f"{stem}.md").write_text(published_markdown(pub) + "\n")
    return ["#### Published numbers side by side", "", published_markdown(pub), ""]


def papers_convention_lines(runs: pd.DataFrame, tables_dir: Path, out: Path) -> List[str]:
    """The accuracy tables in the papers' convention (best test epoch), labelled as such, where the report compares
    another metric; their files carry ``papers_convention`` in the name."""
    lines = ["## The papers' convention: the best test epoch", "",
             f"The same runs in {metric_words(BEST)}: each run's best epoch is chosen on the test set it is scored "
             "on, as timm's `model_best` and the papers report; this is optimistic by construction and is here only "
             "to set our numbers beside published ones. No test, bold or rank is drawn from it.", ""]
    for table in comparison_tables(runs, BEST):
        path = tables_dir / f"comparison_{table.slug}_papers_convention.md"
        body = ["Accuracy:", ""] + table.accuracy_markdown(bold=False)
        path.write_text("\n".join(body) + "\n")
        lines += [f"### {table.title}", ""] + body + ["", f"File: [md]({_rel(path, out)})", ""]
    return lines


def make_report(runs_dir, out_dir, metric: str = PRIMARY, command: Optional[str] = None,
                published: Sequence[str] = (SHIPPED,)) -> Path:
    """Regenerates everything into ``out_dir`` and returns the index (README.md). ``published``: the tables of
    published numbers set beside ours (``published.py``: ``ofa-kd``, the shipped one, or CSV files), read and
    checked before anything is written."""
    out = Path(out_dir)
    tables_dir, figures_dir = out / "tables", out / "figures"
    cells = published_cells(published)
    tidy = tidy_tables(runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    # the report owns these two folders: what an earlier report drew from runs no longer in the store goes
    _clear(tables_dir, (".md", ".tex", ".csv"))
    _clear(figures_dir, (".png", ".pdf"))
    write_tidy(runs_dir, out, tidy)
    runs = tidy["runs"]

    done = runs[runs["status"] == "done"]
    lines: List[str] = ["# hkdbench results", ""]
    lines += [f"Generated by `{command or f'hkdbench report --runs-dir {runs_dir} --out {out_dir}'}` from the stored "
              "run summaries and metrics only.", ""]
    counts = done.groupby("kind").size().to_dict()
    lines += [f"Runs: {len(runs)} in the store, {len(done)} finished "
              f"({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}); "
              f"{int((runs['status'] == 'failed').sum())} failed, {int((runs['status'] == 'unfinished').sum())} "
              "unfinished" + _damaged_note(runs) + ".", ""]
    lines += ["Data: [runs.csv](runs.csv) (one row per run), [epochs.csv](epochs.csv) (one row per run and epoch), "
              "[steps.csv](steps.csv) (one row per run and logged step), "
              "[cka.csv](cka.csv) (one row per run, epoch, kernel and stage pair, with the teacher run probed).", ""]
    lines += provenance_lines(runs_dir, runs)

    lines += ["## Comparison tables", ""] + STATISTICS_LINES
    tables = comparison_tables(runs, metric)
    if not tables:
        lines += ["No finished distillation runs.", ""]
    for table in tables:
        paths = table.write(tables_dir)
        lines += [f"### {table.title}", "", table.to_markdown(title=False), "",
                  "Files: " + ", ".join(f"[{p.suffix[1:]}]({_rel(p, out)})" for p in paths), ""]
        lines += published_lines(table, cells, tables_dir)
    if tables and metric != BEST:
        lines += papers_convention_lines(runs, tables_dir, out)

    lines += ["## Figures", ""]
    figures = all_plots(runs, tidy["epochs"], figures_dir, metric, tables, cka=tidy["cka"], steps=tidy["steps"])
    for figure in FIGURES:
        paths = figures[figure.kind]
        lines += [f"### {figure.title}", ""]
        pngs = [p for p in paths if p.suffix == ".png"]
        if not pngs:
            lines += ["No runs with this data.", ""]
        for png in pngs:
            pdf = png.with_suffix(".pdf")
            lines += [f"[![{png.stem}]({_rel(png, out)})]({_rel(png, out)})", "",
                      f"`{png.stem}`: [PNG]({_rel(png, out)}) · [PDF]({_rel(pdf, out)})", ""]
    index = out / "README.md"
    index.write_text("\n".join(lines).rstrip() + "\n")
    return index
