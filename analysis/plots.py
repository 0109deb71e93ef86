"""Figures (PNG and PDF) drawn from the tidy tables alone (:mod:`.collect`), with matplotlib's Agg backend.

:data:`FIGURES` is the registry: one entry per kind of figure, with its title in the report and the function that
draws it (adding a figure is one entry there). The statistics come from :mod:`.tables` / :mod:`.stats`, so a figure
and a table never disagree. Every series, panel and bar is one method label (``method_label`` of the tidy tables,
:mod:`.order`: ``kd``, ``kd[temperature=4]``): runs of different settings are drawn apart, never averaged; order and
colours come from :mod:`.order`. A figure's title says what sets its setting apart (``setting_label``). Every
function returns the list of files it wrote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hkdbench.benchmark.core.store import (CONFLICT_COSINE, CONFLICT_FRACTION, CONFLICT_NORM_RATIO,  # noqa: E402
                                          CONFLICT_PREFIX, LOSS_PREFIX, STEP_KEY)

from .collect import OWN, cka_table, keyed  # noqa: E402
from .order import BASELINE, REFERENCE, ordered, palette  # noqa: E402
from .stats import (BOOTSTRAP_RESAMPLES, by_seed, holm, paired_difference, significant,  # noqa: E402
                    supported_orders)
from .tables import (PRIMARY, ComparisonTable, comparison_tables, difference_text, metric_words,  # noqa: E402
                     signed)

FORMATS = ("png", "pdf")
DPI = 150


def _style():
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.2)
    plt.rcParams.update({"figure.dpi": DPI, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts if p not in (None, ""))).strip("-")


def _save(fig, out_dir: Path, stem: str) -> List[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        p = out_dir / f"{stem}.{fmt}"
        # no creation date in the PDF: the same runs give byte-identical files (a clean diff after a re-report)
        fig.savefig(p, dpi=DPI, metadata={"CreationDate": None} if fmt == "pdf" else None)
        paths.append(p)
    plt.close(fig)
    return paths


def _grid(n: int, max_cols: int = 4):
    cols = min(n, max_cols)
    return int(np.ceil(n / cols)), cols


def _setting_stem(kind: str, table: ComparisonTable) -> str:
    k = table.key
    return _slug(kind, k["dataset"], k["recipe"], f"{k['epochs']}ep", k["setting"])


def _setting_words(table: ComparisonTable) -> str:
    return f"{table.title} ({table.usual_n()} seeds per cell)"


def _pair_setting(frame: pd.DataFrame) -> str:
    """What sets the setting of a per-pair figure's runs apart, for its title ('' where nothing does)."""
    label = frame["setting_label"].iloc[0] if "setting_label" in frame and len(frame) else ""
    return f"; {label}" if isinstance(label, str) and label else ""


def _legend(fig, methods: Sequence[str], pal: Dict[str, str], **kw) -> None:
    handles = [plt.Line2D([], [], color=pal[m], marker="o", lw=2, label=m) if m != BASELINE else
               plt.Line2D([], [], color=pal[m], marker="s", mfc="none", mew=1.5, ls="--", lw=2, label="none (alone)")
               for m in methods]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="method", **kw)


# --------------------------------------------------------------------------------------------------------------
# Per setting: gain heatmaps, ranks, cost against gain
# --------------------------------------------------------------------------------------------------------------

NOT_SIGNIFICANT_SHADE = 0.25  # how much of a not-significant cell's colour is kept (the rest is light grey)


def _cell_colour(cmap, value: float, limit: float, strong: bool):
    """The diverging colour of ``value``; washed out towards grey where the corrected test does not support it."""
    rgba = np.array(cmap((value + limit) / (2 * limit)))
    if not strong:
        rgba[:3] = NOT_SIGNIFICANT_SHADE * rgba[:3] + (1 - NOT_SIGNIFICANT_SHADE) * 0.9
    return rgba


def gain_heatmaps(tables: Sequence[ComparisonTable], out_dir) -> List[Path]:
    """Per setting, one panel per method over teacher x student: the paired gain over the student alone on a
    diverging scale centred on 0, its 95 % interval written in the cell (``*`` where the Holm-corrected test
    rejects 0); only those cells are coloured at full strength, the others washed out towards grey."""
    _style()
    paths: List[Path] = []
    for table in tables:
        gains = {key: c for key, c in table.cells.items() if c.vs_alone is not None}
        if not gains:
            continue
        teachers = sorted({t for t, _ in table.rows})
        students = sorted({s for _, s in table.rows})
        limit = max(abs(c.vs_alone.mean) for c in gains.values()) or 1.0
        rows, cols = _grid(len(table.methods))
        # a panel is as wide as its students, or as its title (a label such as kd[temperature=4]) needs
        width = max(1.5 * len(students), 0.13 * max(len(m) for m in table.methods))
        # constrained layout keeps each row's tick labels, the next row's titles and the suptitle apart at any
        # number of teacher rows (a fixed spacing let them overlap with one teacher)
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols + 1.5, (1.05 * len(teachers) + 1.3) * rows + 1.0),
                                 squeeze=False, layout="constrained")
        cmap = plt.get_cmap("RdBu")
        for ax, m in zip(axes.flat, table.methods):
            grid = np.full((len(teachers), len(students), 4), [0.933, 0.933, 0.933, 1.0])
            for i, t in enumerate(teachers):
                for j, s in enumerate(students):
                    c = gains.get(((t, s), m))
                    if c is None:
                        ax.text(j, i, "no run", ha="center", va="center", fontsize=8, color="#888888")
                        continue
                    d, strong = c.vs_alone, significant(c.vs_alone, c.holm_alone)
                    grid[i, j] = _cell_colour(cmap, d.mean, limit, strong)
                    text = difference_text(d, 1, c.holm_alone).replace(" [", "\n[")
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if strong and abs(d.mean) > 0.6 * limit else "black")
            ax.imshow(grid, aspect="auto")
            ax.set_facecolor("#eeeeee")
            ax.grid(False)
            ax.set_title(m)
            ax.set_xticks(range(len(students)), students, rotation=20)
            ax.set_yticks(range(len(teachers)), teachers if ax.get_subplotspec().is_first_col() else [])
            ax.set_xlabel("student")
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel("teacher")
        for ax in list(axes.flat)[len(table.methods):]:
            ax.axis("off")
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-limit, limit))
        fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=f"{table.metric} − student alone (points)")
        fig.suptitle(f"Gain in {metric_words(table.metric)} over the student alone, mean [95 % t interval] of the "
                     f"seed-paired difference; * and full colour: Holm-corrected p < 0.05 over the table's cells, "
                     f"washed out: not significant\n{_setting_words(table)}; {table.pairing_note}", fontsize=11)
        paths += _save(fig, out_dir, _setting_stem("gain_heatmap", table))
    return paths


def rank_plots(tables: Sequence[ComparisonTable], out_dir) -> List[Path]:
    """Per setting, every method's average rank across pairs with its bootstrap interval (a dot plot), and its
    win/tie/loss counts against the student alone."""
    _style()
    paths: List[Path] = []
    for table in tables:
        ranks = table.ranks()
        if ranks.empty:
            continue
        pal = palette(ranks.index)
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(ranks) + 1.6))
        y = np.arange(len(ranks))
        for i, (m, r) in enumerate(ranks.iterrows()):
            ax.plot([r.low, r.high], [i, i], color=pal[m], lw=3, solid_capstyle="butt")
            ax.plot(r.mean_rank, i, "o", color=pal[m], ms=8, mec="black")
            ax.text(len(ranks) + 0.6, i, r.wtl_vs_none, va="center", fontsize=10)
        ax.text(len(ranks) + 0.6, -0.9, "W/T/L vs S", va="center", fontsize=10, fontweight="bold")
        ax.set_yticks(y, [m if m != BASELINE else "none (S)" for m in ranks.index])
        ax.set_ylim(len(ranks) - 0.5, -1.4)
        ax.set_xlim(0.5, len(ranks) + 0.5)
        ax.set_xticks(range(1, len(ranks) + 1))
        ax.set_xlabel(f"average rank over {int(ranks['pairs'].iloc[0])} teacher → student pairs (1 = best)")
        ax.set_title(f"Average rank of {metric_words(table.metric)} with 95 % bootstrap interval over pairs and "
                     f"seeds ({BOOTSTRAP_RESAMPLES} resamples)\n{_setting_words(table)}; the orders a test supports: "
                     "the critical-difference diagram", fontsize=10)
        paths += _save(fig, out_dir, _setting_stem("ranks", table))
    return paths


def _cliques(ranks: Dict[str, float], cd: float) -> List[Tuple[float, float]]:
    """The (lowest, highest) average rank of every maximal run of methods, in rank order, whose extremes differ by
    at most the critical difference: the bars of a critical-difference diagram (methods under one bar are not told
    apart by the test)."""
    values = sorted(ranks.values())
    spans = []
    for i, low in enumerate(values):
        j = max(k for k in range(i, len(values)) if values[k] - low <= cd)
        if j > i and not any(a <= low and values[j] <= b for a, b in spans):
            spans.append((low, values[j]))
    return spans


def _cd_axis(ax, ranks: Dict[str, float], cd: float, k: int) -> None:
    """Demsar's (2006) diagram on ``ax``: a rank axis, each method at its average rank (best half on the left),
    the critical difference as a scale bar and a bar under every group the test does not separate."""
    ax.set_xlim(0.5, k + 0.5)
    ax.hlines(0, 1, k, color="black", lw=1)
    for r in range(1, k + 1):
        ax.vlines(r, -0.08, 0.08, color="black", lw=1)
        ax.text(r, 0.18, str(r), ha="center", fontsize=9)
    ax.plot([1, 1 + cd], [0.7, 0.7], color="black", lw=2)
    ax.text(1 + cd / 2, 0.8, f"CD = {cd:.2f}", ha="center", fontsize=9)
    ordered_items = sorted(ranks.items(), key=lambda kv: kv[1])
    half = (len(ordered_items) + 1) // 2
    for i, (m, r) in enumerate(ordered_items):
        left = i < half
        level = -0.45 - 0.32 * (i if left else len(ordered_items) - 1 - i)
        end = 0.6 if left else k + 0.4
        ax.plot([r, r, end], [0, level, level], color="#333333", lw=1)
        ax.text(end - 0.05 if left else end + 0.05, level, f"{m if m != BASELINE else 'none (S)'} ({r:.2f})",
                ha="right" if left else "left", va="center", fontsize=9)
    for n, (low, high) in enumerate(_cliques(ranks, cd)):
        y = -0.2 - 0.1 * n
        ax.plot([low - 0.03, high + 0.03], [y, y], color="black", lw=3, solid_capstyle="butt")
    ax.set_ylim(-0.6 - 0.32 * half, 1.0)
    ax.axis("off")


def cd_diagrams(tables: Sequence[ComparisonTable], out_dir) -> List[Path]:
    """Per setting, the critical-difference diagram of the Nemenyi test after Friedman's (Demsar 2006): the
    average ranks across pairs on one axis, joined by a bar where they differ by less than the critical
    difference. The title gives the Friedman test; where it does not reject, every method is under one bar."""
    _style()
    paths: List[Path] = []
    for table in tables:
        test = table.rank_test()
        if test is None:
            continue
        ranks = table.ranks()["mean_rank"].to_dict()
        cd = test.cd if test.rejects else float("inf")
        fig, ax = plt.subplots(figsize=(8.5, 1.6 + 0.18 * len(ranks)))
        _cd_axis(ax, ranks, min(cd, len(ranks) - 1.0), len(ranks))
        orders = len(supported_orders(ranks, test))
        verdict = (f"F rejects equal ranks; {orders} order(s) supported" if test.rejects else
                   "F does not reject equal ranks: no order supported, one bar")
        ax.set_title(f"Critical-difference diagram (Nemenyi, α = 0.05) of {metric_words(table.metric)}, "
                     f"{test.pairs} pairs\nFriedman χ² = {test.chi2:.2f} (p = {test.p_chi2:.3g}), Iman–Davenport "
                     f"F = {test.f:.2f} (p = {test.p_f:.3g}): {verdict}\n{_setting_words(table)}", fontsize=10)
        paths += _save(fig, out_dir, _setting_stem("cd_diagram", table))
    return paths


def _overhead_medians(runs: pd.DataFrame, column: str) -> Dict[Tuple[str, str, str], float]:
    """The median of ``column`` over the records `hkdbench overhead` measured of every (teacher, student, method):
    a cost measured in isolation (train step time at one batch size and device; GFLOPs per image), not a run's wall
    time, which depends on what else the machine ran and on the cohort it trained in."""
    ov = runs[(runs["kind"] == "overhead") & (runs["status"] == "done")]
    if ov.empty or column not in ov:
        return {}
    values = pd.to_numeric(ov[column], errors="coerce")
    return {k: float(v) for k, v in values.groupby([ov["overhead_teacher"], ov["student"], ov["method_label"]])
            .median().items() if not pd.isna(v)}


def _overhead_setup(runs: pd.DataFrame) -> str:
    """Where the overhead records were measured: batch size(s), resolution(s) and device(s), in words."""
    ov = runs[(runs["kind"] == "overhead") & (runs["status"] == "done")]
    parts = [", ".join(sorted({f"{v:g}" if isinstance(v, float) else str(v) for v in ov[c].dropna()}))
             if c in ov else "?" for c in ("batch_size", "img_size", "device")]
    return f"batch {parts[0]}, {parts[1]} px, {parts[2]}"


def _log_axis(axis) -> None:
    """A log axis with 1-2-5 ticks written as plain numbers (0.02, not 2x10^-2), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_xscale("log") if axis is axis.axes.xaxis else axis.axes.set_yscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _cost_figure(table: ComparisonTable, cost: Dict[Tuple[str, str, str], float], xlabel: str, what: str,
                 out_dir, stem: str) -> List[Path]:
    def drawable(p, m):
        return (p[0], p[1], m) in cost and (p, m) in table.cells and table.cells[(p, m)].vs_alone is not None

    pairs = [p for p in table.rows if any(drawable(p, m) for m in table.methods)]
    if not pairs:
        return []
    methods = [BASELINE] + table.methods
    # methods of equal cost (KD, DKD, DIST: one teacher pass, logits only) would hide each other at one x: each is
    # drawn a little apart, by a factor on the log axis far below the differences the figure is read for
    dodge = {m: DODGE_FACTOR ** (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
    pal = palette(methods)
    rows, cols = _grid(len(pairs), 3)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.9 * rows), squeeze=False)
    for ax, pair in zip(axes.flat, pairs):
        for m in methods:
            x = cost.get((pair[0], pair[1], m))
            if x is None:
                continue
            x *= dodge[m]
            if m == BASELINE:
                ax.plot(x, 0.0, "D", color=pal[m], ms=8, mec="black")
                continue
            d = table.cells[(pair, m)].vs_alone if (pair, m) in table.cells else None
            if d is None:
                continue
            err = None if d.low is None else [[d.mean - d.low], [d.high - d.mean]]
            ax.errorbar(x, d.mean, yerr=err, fmt="o", color=pal[m], ms=7, mec="black", capsize=3, lw=1.5)
        ax.axhline(0, color="black", lw=0.8)
        _log_axis(ax.xaxis)
        ax.set_title(f"{pair[0]} → {pair[1]}", fontsize=11)
        ax.set_xlabel(xlabel)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("gain over student alone (points)")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    _legend(fig, methods, pal)
    fig.suptitle(f"Gain in {metric_words(table.metric)} against {what}: one point per method and pair, bar = 95 % t "
                 f"interval of the seed-paired gain (◆ the student alone; methods of equal cost drawn a hair apart)"
                 f"\n{_setting_words(table)}; {table.pairing_note}", y=1.03, fontsize=11)
    fig.tight_layout()
    return _save(fig, out_dir, stem)


def cost_time_plots(tables: Sequence[ComparisonTable], runs: pd.DataFrame, out_dir) -> List[Path]:
    """Gain against the train step time `hkdbench overhead` measured (median ms), for the pairs it measured."""
    _style()
    step_ms, setup = _overhead_medians(runs, "step_time_ms"), _overhead_setup(runs)
    paths: List[Path] = []
    for table in tables:
        paths += _cost_figure(table, step_ms, "train step time (ms, median; log)",
                              f"the measured train step time (hkdbench overhead: {setup}; measured pairs only)",
                              out_dir, _setting_stem("cost_time", table))
    return paths


def cost_flops_plots(tables: Sequence[ComparisonTable], runs: pd.DataFrame, out_dir) -> List[Path]:
    """Gain against train GFLOPs per image, for the pairs that `hkdbench overhead` measured."""
    _style()
    flops = _overhead_medians(runs, "train_gflops_per_image")
    paths: List[Path] = []
    for table in tables:
        paths += _cost_figure(table, flops, "train GFLOPs per image (log)",
                              "train GFLOPs per image (hkdbench overhead; measured pairs only)", out_dir,
                              _setting_stem("cost_flops", table))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Overhead bars
# --------------------------------------------------------------------------------------------------------------

def _repeat_range(row) -> Tuple[float, float]:
    """Fastest and slowest timed step (ms); the median stands in for the slowest where the record predates the
    per-repeat times."""
    times = row.get("step_times_ms")
    if isinstance(times, (list, tuple)) and times:
        return float(min(times)), float(max(times))
    median = float(row["step_time_ms"])
    low = pd.to_numeric(row.get("step_time_ms_min"), errors="coerce")
    return (median if pd.isna(low) else float(low)), median


_OVERHEAD_PANELS = [("step_time_ms", "train step time (ms, median)"),
                    ("step_time_ms_vs_none", "step time ÷ student alone (×)"),
                    ("train_gflops_per_image", "train GFLOPs / image"),
                    ("peak_memory_mb", "peak memory (MiB)"),
                    ("extra_params", "extra trainable params (M)")]


def overhead_bars(runs: pd.DataFrame, out_dir) -> List[Path]:
    """Per measured pair / batch / device: step time (whisker: fastest to slowest timed step), its ratio to the
    student alone, train FLOPs, peak memory and the method's extra parameters, each in its own panel."""
    _style()
    df = runs[(runs["kind"] == "overhead") & (runs["status"] == "done")].copy()
    if df.empty:
        return []
    keys = ["overhead_teacher", "student", "batch_size", "img_size", "device", "precision"]
    df = keyed(df, keys)
    paths: List[Path] = []
    for key, g in df.groupby(keys):
        k = dict(zip(keys, key))
        g = g.set_index("method_label")
        methods = ordered(g.index)
        g = g.loc[methods]
        pal = palette(methods)
        fig, axes = plt.subplots(1, len(_OVERHEAD_PANELS), figsize=(3.5 * len(_OVERHEAD_PANELS),
                                                                   0.42 * len(methods) + 1.8), sharey=True)
        y = np.arange(len(methods))
        for ax, (col, label) in zip(axes, _OVERHEAD_PANELS):
            vals = pd.to_numeric(g[col], errors="coerce").to_numpy(dtype=float) if col in g else np.full(len(y),
                                                                                                        np.nan)
            if col == "extra_params":
                vals = vals / 1e6
            ax.barh(y, np.nan_to_num(vals), color=[pal[m] for m in methods])
            if col == "step_time_ms":
                spans = np.array([_repeat_range(g.loc[m]) for m in methods])
                ax.errorbar(vals, y, xerr=[vals - spans[:, 0], spans[:, 1] - vals], fmt="none", ecolor="black",
                            capsize=2, lw=1)
            if col == "step_time_ms_vs_none":
                ax.axvline(1.0, color="black", lw=0.8)
            ax.set_title(label, fontsize=11)
            top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
            ax.set_xlim(0, (top if top > 0 else 1.0) * 1.45)
            for i, v in enumerate(vals):
                text = "n/a" if not np.isfinite(v) else (f"×{v:.2f}" if col.endswith("_vs_none") else
                                                         f"{v:.0f}" if v >= 100 else f"{v:.3g}")
                ax.text(0 if not np.isfinite(v) else v, i, " " + text, va="center", fontsize=9)
        axes[0].set_yticks(y, methods)
        axes[0].invert_yaxis()
        repeats = g["repeats"].dropna().iloc[0] if "repeats" in g and g["repeats"].notna().any() else "?"
        fig.suptitle(f"Training cost per method: {k['overhead_teacher']} → {k['student']}, batch {k['batch_size']}, "
                     f"{k['img_size']} px, {k['device']}, {k['precision']}; median of {repeats} timed steps, whisker "
                     "fastest to slowest (to the median where only the fastest was stored)", fontsize=11, y=1.04)
        paths += _save(fig, out_dir, _slug("overhead", k["overhead_teacher"], "to", k["student"],
                                           f"b{k['batch_size']}", f"{k['img_size']}px", k["device"]))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Per pair, over epochs
# --------------------------------------------------------------------------------------------------------------

def _pairs(epochs: pd.DataFrame):
    """(teacher, student, dataset, setting) groups of distillation runs, with the student-alone runs attached (every
    label of the method ``none``)."""
    df = keyed(epochs[epochs["kind"] == "student"], ["setting"])
    if df.empty:
        return
    distilled = df[df["method"] != BASELINE]
    alone = df[df["method"] == BASELINE]
    for (t, s, d, st), g in distilled.groupby(["teacher", "student", "dataset", "setting"]):
        base = alone[(alone["student"] == s) & (alone["dataset"] == d) & (alone["setting"] == st)]
        yield (t, s, d, st), g, base


DODGE_FACTOR = 1.02  # on a log cost axis: 2 % between two methods' points
DODGE = 0.04  # epochs between two methods' points: series with equal values stay apart (the student alone vs KD)


def _band_plot(ax, frame: pd.DataFrame, y: str, pal: Dict[str, str], methods: Sequence[str],
               x: str = "epoch", dodge: float = DODGE) -> None:
    """Mean over seeds per ``x`` (epoch or step), with a band from the lowest to the highest seed; markers only where
    the points are few enough to tell apart. Each method's points are shifted by a small ``dodge`` along x, and the
    student alone is drawn last, dashed with open squares, so that a line under another of the same values (the
    student alone under KD's) stays visible."""
    drawn = [m for m in methods if m != BASELINE] + [m for m in methods if m == BASELINE]
    for m in drawn:
        mg = frame[frame["method_label"] == m][[x, y, "run"]].copy()
        mg[y] = pd.to_numeric(mg[y], errors="coerce")
        mg = mg.dropna(subset=[y])
        if mg.empty:
            continue
        stats = mg.groupby(x)[y].agg(["mean", "min", "max"]).reset_index()
        xs = stats[x].astype(float) + (list(methods).index(m) - (len(methods) - 1) / 2) * dodge
        alone, few = m == BASELINE, len(stats) <= 40
        ax.plot(xs, stats["mean"], "--" if alone else "-", marker=("s" if alone else "o") if few else None,
                ms=6 if alone else 4, mfc="none" if alone else pal[m], mew=1.5, color=pal[m], lw=2.2 if alone else 1.8,
                zorder=4 if alone else 2)
        if mg["run"].nunique() > 1:
            ax.fill_between(xs, stats["min"], stats["max"], color=pal[m], alpha=0.15, lw=0)


def _epoch_words(frame: pd.DataFrame) -> str:
    n = frame["epoch"].nunique()
    seeds = frame.groupby("method_label")["run"].nunique()
    seeds = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    few = " (too few for a curve: read them as points)" if n < 3 else ""
    return (f"{n} point{'s' if n != 1 else ''} per line (one per evaluated epoch){few}, {seeds} seeds per series; "
            f"line: mean, band: lowest to highest seed; points shifted by ±{DODGE:g} epoch per method to stay apart")


def _cka_groups(cka: pd.DataFrame):
    """Per (teacher, student, dataset, setting, kernel): the distilled runs' CKA rows against their own teacher, and
    the student alone's rows against the same teacher run (empty where it was not probed against it, or where the
    distilled runs do not share one teacher run, e.g. teachers from checkpoints, which have none)."""
    df = keyed(cka, ["setting", "teacher_run"])
    distilled = df[(df["method"] != BASELINE) & (df["probe"] == OWN)]
    alone = df[df["method"] == BASELINE]
    for (t, s, d, st, k), g in distilled.groupby(["teacher", "student", "dataset", "setting", "kernel"]):
        shared = set(g["teacher_run"]) if g["teacher_run"].nunique() == 1 else set()
        base = alone[alone["teacher_run"].isin(shared - {"-"}) & (alone["student"] == s) & (alone["dataset"] == d)
                     & (alone["setting"] == st) & (alone["kernel"] == k)]
        yield (t, s, d, st, k), g, base


def _last_probes(rows: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows of its last probed epoch."""
    return rows[rows["epoch"] == rows.groupby("run")["epoch"].transform("max")]


_STAGES = ["teacher_stage", "student_stage"]


def cka_change(g: pd.DataFrame, base: pd.DataFrame) -> Tuple[Optional[pd.DataFrame], str]:
    """Per method label and stage pair, the mean over seeds of the last probed CKA minus the reference's, and which
    reference: the student alone (``base``, probed against the same teacher run) where there is one, else KD (their
    default labels). Columns: method_label, teacher_stage, student_stage, cka, reference, change, n (runs), p (the
    seed-paired difference's t test), p_holm (Holm-corrected over every cell of the figure: one family) and
    significant (p_holm < 0.05). None where the reference or anything to compare with it is missing."""
    ref = BASELINE if not base.empty else REFERENCE
    last = _last_probes(pd.concat([g, base], ignore_index=True))
    ref_rows = last[last["method_label"] == ref]
    if ref_rows.empty or (last["method_label"] == ref).all():
        return None, ref
    ref_seeds = {k: by_seed(c, "cka") for k, c in ref_rows.groupby(_STAGES)}
    rows = []
    for (m, i, j), cell in last[last["method_label"] != ref].groupby(["method_label"] + _STAGES):
        paired = paired_difference(by_seed(cell, "cka"), ref_seeds.get((i, j), {}))
        rows.append({"method_label": m, "teacher_stage": i, "student_stage": j, "cka": cell["cka"].mean(),
                     "n": cell["run"].nunique(), "p": paired.p if paired is not None else None})
    out = pd.DataFrame(rows).join(ref_rows.groupby(_STAGES)["cka"].mean().rename("reference"), on=_STAGES)
    out["p_holm"] = holm([None if pd.isna(p) else p for p in out["p"]])
    out["significant"] = [p is not None and not pd.isna(p) and p < 0.05 for p in out["p_holm"]]
    out["change"] = out["cka"] - out["reference"]
    return out, ref


def _change_panel(ax, cells: pd.DataFrame, ts: List[int], ss: List[int], cmap, limit: float) -> None:
    grid = np.full((len(ts), len(ss)), np.nan)
    for c in cells.itertuples():
        grid[ts.index(c.teacher_stage), ss.index(c.student_stage)] = c.change
        if not np.isnan(c.change):
            star = "*" if c.significant else ""
            ax.text(ss.index(c.student_stage), ts.index(c.teacher_stage), f"{signed(c.change)}{star}", ha="center",
                    va="center", fontsize=8, color="white" if abs(c.change) > 0.6 * limit else "black")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-limit, vmax=limit)
    ax.set_facecolor("#eeeeee")
    ax.grid(False)


def _change_title(kernel: str, ref: str) -> str:
    if ref == BASELINE:
        return (f"Change in CKA ({kernel}, unbiased HSIC) from the student alone (none, probed against the same "
                "teacher run)")
    return (f"Change in CKA ({kernel}, unbiased HSIC) from {ref} (no student-alone run was probed against this "
            "teacher run)")


def cka_change_heatmaps(cka: pd.DataFrame, out_dir) -> List[Path]:
    """Per pair and kernel, each method's last-epoch CKA minus the reference's (:func:`cka_change`), per (teacher
    stage, student stage), on a diverging scale centred on 0 and shared by every CKA-change figure (so that their
    colours compare); the title names the reference."""
    _style()
    paths: List[Path] = []
    figures = [(key, g) + cka_change(g, base) for key, g, base in _cka_groups(cka)]
    figures = [f for f in figures if f[2] is not None]
    changes = [float(f[2]["change"].abs().max()) for f in figures]
    limit = max([c for c in changes if c > 0], default=0.01)  # also when every cell is NaN (no reference there)
    for (t, s, d, st, kernel), g, change, ref in figures:
        methods = ordered(change["method_label"])
        ts, ss = sorted(set(change["teacher_stage"])), sorted(set(change["student_stage"]))
        n = change.groupby("method_label")["n"].max()
        rows, ncols = _grid(len(methods))
        fig, axes = plt.subplots(rows, ncols, figsize=(3.2 * ncols + 1.0, 3.0 * rows + 0.8), squeeze=False)
        cmap = plt.get_cmap("RdBu")
        for ax, m in zip(axes.flat, methods):
            _change_panel(ax, change[change["method_label"] == m], ts, ss, cmap, limit)
            ax.set_title(f"{m} (n={n[m]})", fontsize=10)
            ax.set_xticks(range(len(ss)), [f"S{j}" for j in ss])
            ax.set_yticks(range(len(ts)), [f"T{i}" for i in ts] if ax.get_subplotspec().is_first_col() else [])
            ax.set_xlabel(f"student stage ({s})")
            if ax.get_subplotspec().is_first_col():
                ax.set_ylabel(f"teacher stage ({t})")
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(-limit, limit))
        fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=f"CKA − CKA of {ref}")
        fig.suptitle(f"{_change_title(kernel, ref)}\nlast probed epoch, mean over seeds: {t} → {s}, "
                     f"{d}{_pair_setting(g)}; * Holm-corrected p < 0.05 over this figure's cells (seed-paired t "
                     f"tests); colour scale ±{limit:.2f}, shared by every CKA-change figure", y=1.03, fontsize=11)
        paths += _save(fig, out_dir, _slug("cka_change", kernel, t, "to", s, d, st))
    return paths


def cka_epoch_curves(cka: pd.DataFrame, out_dir) -> List[Path]:
    """Per pair and kernel, one panel per (teacher stage, student stage): CKA over epochs per method, the student
    alone dashed where it was probed against the same teacher run."""
    _style()
    paths: List[Path] = []
    for (t, s, d, st, kernel), g, base in _cka_groups(cka):
        frame = pd.concat([g, base], ignore_index=True)
        methods = ordered(frame["method_label"])
        pal = palette(methods)
        ts, ss = sorted(set(frame["teacher_stage"])), sorted(set(frame["student_stage"]))
        fig, axes = plt.subplots(len(ts), len(ss), figsize=(2.9 * len(ss), 2.3 * len(ts)), sharex=True,
                                 sharey=True, squeeze=False)
        for (i, j), cell in frame.groupby(_STAGES):
            ax = axes[ts.index(i), ss.index(j)]
            _band_plot(ax, cell, "cka", pal, methods)
            ax.set_title(f"T{i} – S{j}", fontsize=9)
            ax.xaxis.get_major_locator().set_params(integer=True)
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        for ax in axes[:, 0]:
            ax.set_ylabel(f"CKA ({kernel})")
        _legend(fig, methods, pal)
        alone = "" if base.empty else ("\ndashed with open squares, drawn on top: the student alone, probed against "
                                       "the same teacher run")
        fig.suptitle(f"CKA ({kernel}) per teacher-stage / student-stage pair over training: {t} → {s}, {d}"
                     f"{_pair_setting(g)}\n"
                     f"{_epoch_words(frame)}{alone}", y=1.02, fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("cka_epochs", kernel, t, "to", s, d, st))
    return paths

_CONFLICT_PANELS = [(CONFLICT_COSINE, "cosine(g_task, g_distill)"),
                    (CONFLICT_FRACTION, "fraction of probed steps with cosine < 0"),
                    (CONFLICT_NORM_RATIO, "‖g_distill‖ / ‖g_task‖ (log)")]
CONFLICT_STEPS = CONFLICT_PREFIX + "steps"   # how many steps an epoch's conflict values average


def _conflict_panels(g: pd.DataFrame) -> List[Tuple[str, str]]:
    """The panels, the fraction's label saying its resolution: with k probed steps an epoch it moves in steps of
    1 / k (3 probes: 0, 1/3, 2/3 or 1)."""
    steps = pd.to_numeric(g.get(CONFLICT_STEPS, pd.Series(dtype=float)), errors="coerce").dropna()
    if steps.empty:
        return _CONFLICT_PANELS
    low, high = int(steps.min()), int(steps.max())
    k, unit = (f"{low}", f"1/{low}") if low == high else (f"{low}-{high}", "1/k")
    fraction = f"fraction of probed steps with cosine < 0\n({k} probed steps an epoch: multiples of {unit})"
    return [(c, fraction if c == CONFLICT_FRACTION else label) for c, label in _CONFLICT_PANELS]


OUTLIER_RATIO = 100.0  # a norm ratio above this is labelled: the task gradient is then negligible after clipping


def conflict_points(epochs: pd.DataFrame, out_dir) -> List[Path]:
    """Per pair, every probed (run, epoch) value as its own point per method (x jittered by seed, marker by epoch),
    so that equal values stay visible; norm ratios above ``OUTLIER_RATIO`` are labelled with their value."""
    _style()
    if CONFLICT_COSINE not in epochs.columns:
        return []
    paths: List[Path] = []
    markers = "os^Dv<>p"
    for (t, s, d, st), g, _ in _pairs(epochs):
        g = g.dropna(subset=[CONFLICT_COSINE])
        if g.empty:
            continue
        methods = ordered(g["method_label"])
        pal = palette(methods)
        epochs_seen = sorted(g["epoch"].unique())
        seeds = sorted(g["seed"].dropna().unique())
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
        for ax, (col, label) in zip(axes, _conflict_panels(g)):
            if col not in g:
                continue
            outliers: List[Tuple[float, int]] = []
            for x, m in enumerate(methods):
                mg = g[g["method_label"] == m]
                for _, r in mg.iterrows():
                    v = pd.to_numeric(r[col], errors="coerce")
                    if pd.isna(v):
                        continue
                    dx = (seeds.index(r["seed"]) - (len(seeds) - 1) / 2) * 0.18 if r["seed"] in seeds else 0.0
                    dx += (epochs_seen.index(r["epoch"]) - (len(epochs_seen) - 1) / 2) * 0.08
                    ax.plot(x + dx, v, markers[epochs_seen.index(r["epoch"]) % len(markers)], color=pal[m], ms=6,
                            mec="black", mew=0.5, alpha=0.9)
                    if col == CONFLICT_NORM_RATIO and v > OUTLIER_RATIO:
                        outliers.append((v, int(r["epoch"])))
                if outliers:  # one label per method: the range of its outliers and their epochs
                    vs, es = [v for v, _ in outliers], sorted({e for _, e in outliers})
                    ax.annotate(f"{m}: {min(vs):.1e}–{max(vs):.1e}\n(epoch {', '.join(map(str, es))})",
                                (x, max(vs)), xytext=(12, -12), textcoords="offset points", fontsize=8)
                    outliers = []
            ax.set_xticks(range(len(methods)), methods, rotation=30)
            ax.set_xlim(-0.6, len(methods) - 0.4 + (1.2 if col == CONFLICT_NORM_RATIO else 0))
            ax.set_ylabel(label)
        axes[0].axhline(0, color="black", lw=0.8)
        axes[0].set_ylim(-1.05, 1.05)
        axes[1].set_ylim(-0.05, 1.05)
        axes[2].set_yscale("log")
        axes[2].axhline(1.0, color="black", lw=0.8)
        handles = [plt.Line2D([], [], ls="", marker=markers[i % len(markers)], color="grey", mec="black",
                              label=f"epoch {e}") for i, e in enumerate(epochs_seen)]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="epoch mean of")
        fig.suptitle(f"Gradient conflict between the task (CE) and distillation losses on the student: {t} → {s}, "
                     f"{d}{_pair_setting(g)}\none point per run and epoch (mean over that epoch's probed steps), "
                     f"seeds side by side; labelled: norm ratio > {OUTLIER_RATIO:g} (the CE gradient is then lost "
                     "under clipping)",
                     y=1.06, fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("conflict", t, "to", s, d, st))
    return paths


_CONVERGENCE_PANELS = [("top1", "test top-1 (%)"), ("eval_loss", "test cross-entropy (task loss)")]


def convergence_curves(epochs: pd.DataFrame, out_dir) -> List[Path]:
    """Per pair, test top-1 and the task loss alone (test cross-entropy, the same quantity for every method; never
    the sum of a method's weighted terms) over epochs, per method and the student alone."""
    _style()
    if epochs.empty or "top1" not in epochs.columns:
        return []
    paths: List[Path] = []
    for (t, s, d, st), g, base in _pairs(epochs):
        frame = pd.concat([g, base], ignore_index=True)
        methods = ordered(frame["method_label"])
        pal = palette(methods)
        panels = [p for p in _CONVERGENCE_PANELS if p[0] in frame]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.4), squeeze=False)
        for ax, (col, label) in zip(axes[0], panels):
            _band_plot(ax, frame, col, pal, methods)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(fig, methods, pal)
        fig.suptitle(f"Convergence: {t} → {s}, {d}{_pair_setting(g)} (dashed, open squares: student alone)\n"
                     f"{_epoch_words(frame)}", y=1.04, fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("convergence", t, "to", s, d, st))
    return paths


_LOSS_PANELS = [("train_loss", "training loss (the sum of the method's terms)"),
                (LOSS_PREFIX + "ce", "its task term (loss/ce)")]


def loss_curves(steps: pd.DataFrame, out_dir) -> List[Path]:
    """Per pair, the training loss the method minimises and its task term over the logged steps (steps.jsonl, every
    train.log_interval steps: each the value of that step), per method and the student alone. The sums of different
    methods' terms are different quantities: the figure shows how each trains, the convergence figure compares."""
    _style()
    if steps is None or steps.empty or "train_loss" not in steps.columns:
        return []
    paths: List[Path] = []
    for (t, s, d, st), g, base in _pairs(steps):
        frame = pd.concat([g, base], ignore_index=True)
        methods = ordered(frame["method_label"])
        pal = palette(methods)
        panels = [p for p in _LOSS_PANELS if p[0] in frame and frame[p[0]].notna().any()]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.8 * len(panels), 4.4), squeeze=False)
        for ax, (col, label) in zip(axes[0], panels):
            _band_plot(ax, frame, col, pal, methods, x=STEP_KEY, dodge=0.0)
            ax.set_xlabel("step (optimiser steps done)")
            ax.set_ylabel(label)
        _legend(fig, methods, pal)
        fig.suptitle(f"Training loss: {t} → {s}, {d}{_pair_setting(g)} (dashed: student alone)\n"
                     f"{_step_words(frame)}", y=1.04, fontsize=11)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("loss_curve", t, "to", s, d, st))
    return paths


def _step_words(frame: pd.DataFrame) -> str:
    seeds = frame.groupby("method_label")["run"].nunique()
    seeds = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    return (f"{frame[STEP_KEY].nunique()} logged steps, {seeds} seeds per series; line: mean, band: lowest to "
            "highest seed")


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tables:
    """What the figures are drawn from: the tidy tables of :mod:`.collect` and the comparison tables."""
    runs: pd.DataFrame
    epochs: pd.DataFrame
    cka: pd.DataFrame
    comparisons: List[ComparisonTable]
    steps: Optional[pd.DataFrame] = None  # collect_steps' table (None: no per-step curves)


@dataclass(frozen=True)
class Figure:
    kind: str
    title: str                                               # the heading in the report
    draw: Callable[[Tables, Path], List[Path]]


FIGURES: List[Figure] = [
    Figure("gain", "Gain over the student alone, with intervals (teacher × student, per method)",
           lambda t, out: gain_heatmaps(t.comparisons, out)),
    Figure("ranks", "Average rank across pairs", lambda t, out: rank_plots(t.comparisons, out)),
    Figure("cd_diagram", "Critical-difference diagram (Friedman, Nemenyi)",
           lambda t, out: cd_diagrams(t.comparisons, out)),
    Figure("cost_time", "Gain against measured step time", lambda t, out: cost_time_plots(t.comparisons, t.runs, out)),
    Figure("cost_flops", "Gain against train FLOPs per image",
           lambda t, out: cost_flops_plots(t.comparisons, t.runs, out)),
    Figure("overhead", "Training overhead per method", lambda t, out: overhead_bars(t.runs, out)),
    Figure("cka_change", "CKA: change per stage pair", lambda t, out: cka_change_heatmaps(t.cka, out)),
    Figure("cka_epochs", "CKA per stage pair over epochs", lambda t, out: cka_epoch_curves(t.cka, out)),
    Figure("conflict", "Gradient conflict", lambda t, out: conflict_points(t.epochs, out)),
    Figure("convergence", "Convergence (top-1 and task loss)", lambda t, out: convergence_curves(t.epochs, out)),
    Figure("loss_curves", "Training loss per step", lambda t, out: loss_curves(t.steps, out)),
]


def all_plots(runs: pd.DataFrame, epochs: pd.DataFrame, out_dir, metric: str = PRIMARY,
              tables: Sequence[ComparisonTable] = None, cka: Optional[pd.DataFrame] = None,
              steps: Optional[pd.DataFrame] = None) -> Dict[str, List[Path]]:
    """Every figure of :data:`FIGURES`, by kind. ``cka``: :func:`.collect.collect_cka`'s table; without it, the one
    of ``epochs``' own CKA columns (collect_epochs drops the student alone's ``cka@`` probes, so the CKA change is
    then taken from KD). ``steps``: :func:`.collect.collect_steps`' table (without it, no training-loss curves)."""
    tables = comparison_tables(runs, metric) if tables is None else list(tables)
    cka = cka_table(epochs, runs) if cka is None else cka
    return {f.kind: f.draw(Tables(runs, epochs, cka, tables, steps), Path(out_dir)) for f in FIGURES}
