"""Figures (PNG and PDF), drawn from the tidy tables alone (:mod:`.collect`), with matplotlib's Agg backend.

* :func:`accuracy_heatmaps`: mean best top-1 over teacher x student, one panel per method (shared colour scale,
  values printed), one figure per comparable setting.
* :func:`overhead_bars`: step time, peak memory, train FLOPs per image and extra parameters per method, with the
  ratio to the student trained alone on each bar, one figure per measured pair / batch size / device.
* :func:`cka_heatmaps`: the last-epoch CKA (teacher stage x student stage) per method, averaged over seeds.
* :func:`conflict_curves`: gradient-conflict cosine, conflicting fraction and norm ratio vs epoch per method.
* :func:`convergence_curves`: test top-1 and training loss vs epoch per method (the student alone included),
  mean line with a +- std band over seeds.

Every function returns the list of files it wrote.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .collect import keyed  # noqa: E402
from .tables import BASELINE, _method_order  # noqa: E402

FORMATS = ("png", "pdf")
DPI = 150


def _style():
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", font_scale=1.25)
    plt.rcParams.update({"figure.dpi": DPI, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(str(p) for p in parts if p not in (None, ""))).strip("-")


def _save(fig, out_dir: Path, stem: str) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in FORMATS:
        p = out_dir / f"{stem}.{fmt}"
        # no creation date in the PDF: the same runs give byte-identical files (a clean diff after a re-report)
        fig.savefig(p, dpi=DPI, metadata={"CreationDate": None} if fmt == "pdf" else None)
        paths.append(p)
    plt.close(fig)
    return paths


def _methods(values) -> List[str]:
    return sorted(set(values), key=lambda m: (m != BASELINE, _method_order(m)))


def _palette(methods: Sequence[str]) -> Dict[str, tuple]:
    import seaborn as sns

    everything = [BASELINE] + [m for m in sorted(set(_KNOWN) | set(methods), key=_method_order) if m != BASELINE]
    colours = sns.color_palette("tab10", n_colors=max(10, len(everything)))
    return {m: colours[i % len(colours)] for i, m in enumerate(everything)}


_KNOWN = ["kd", "dkd", "dist", "fitnet", "ofa", "pat", "hcd", "spofa"]


def _first_column_only(ax, ylabel: str) -> None:
    """Panels of a row share their y categories: label them on the first column only."""
    if ax.get_subplotspec().is_first_col():
        ax.set_ylabel(ylabel)
    else:
        ax.set_ylabel("")
        ax.set_yticklabels([])


def _grid(n: int, max_cols: int = 4):
    cols = min(n, max_cols)
    rows = int(np.ceil(n / cols))
    return rows, cols


# --------------------------------------------------------------------------------------------------------------
# Accuracy heatmaps
# --------------------------------------------------------------------------------------------------------------

SETTING_KEYS = ["dataset", "recipe", "epochs", "setting"]


def cell_means(runs: pd.DataFrame, metric: str = "best_top1", gain: bool = False) -> pd.Series:
    """The mean ``metric`` over seeds of every distilled (setting, method, teacher, student) cell; with ``gain``,
    minus the mean of the student trained alone in the same setting (NaN where there is no such run)."""
    done = runs[(runs["kind"] == "student") & (runs["status"] == "done")]
    df = keyed(done[done["method"] != BASELINE], SETTING_KEYS)
    mean = df.groupby(SETTING_KEYS + ["method", "teacher", "student"])[metric].mean()
    if gain:
        alone = keyed(done[done["method"] == BASELINE], SETTING_KEYS).groupby(SETTING_KEYS + ["student"])[metric]
        alone = alone.mean()
        mean = mean - [alone.get((*key[:4], key[-1]), np.nan) for key in mean.index]
    return mean


def accuracy_heatmaps(runs: pd.DataFrame, out_dir, metric: str = "best_top1", gain: bool = False) -> List[Path]:
    """Per setting, one panel per method of :func:`cell_means` over teacher x student (``gain``: a diverging map
    centred on 0)."""
    import seaborn as sns

    _style()
    out_dir = Path(out_dir)
    means = cell_means(runs, metric, gain)
    keys = SETTING_KEYS
    paths: List[Path] = []
    for key, setting_means in means.groupby(level=keys):
        mean = setting_means.droplevel(keys)
        if mean.isna().all():
            continue
        methods = _methods(mean.index.get_level_values("method"))
        teachers = sorted(set(mean.index.get_level_values("teacher")))
        students = sorted(set(mean.index.get_level_values("student")))
        if gain:
            limit = float(np.nanmax(np.abs(mean.values))) or 1.0
            vmin, vmax, cmap, fmt = -limit, limit, "RdBu", "+.1f"
        else:
            vmin, vmax, cmap, fmt = float(mean.min()), float(mean.max()), "viridis", ".1f"
        rows, cols = _grid(len(methods))
        cell_w = 0.9 * len(students) + 1.6
        cell_h = 0.6 * len(teachers) + 1.2
        fig, axes = plt.subplots(rows, cols, figsize=(max(3.2, cell_w) * cols, max(2.4, cell_h) * rows + 0.6),
                                 squeeze=False)
        for ax, m in zip(axes.flat, methods):
            grid = pd.DataFrame(np.nan, index=teachers, columns=students)
            for (mm, t, s), v in mean.items():
                if mm == m:
                    grid.loc[t, s] = v
            sns.heatmap(grid, ax=ax, annot=True, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax, cbar=False,
                        linewidths=0.5, linecolor="white", annot_kws={"fontsize": 11})
            ax.set_title(m)
            ax.grid(False)
            ax.set_facecolor("#eeeeee")  # pairs without runs, said in words (light grey is also ~0 on a gain map)
            for i, j in zip(*np.where(grid.isna().values)):
                ax.text(j + 0.5, i + 0.5, "no run", ha="center", va="center", color="#888888", fontsize=9)
            ax.set_xlabel("student")
            ax.tick_params(axis="x", rotation=30)
            ax.tick_params(axis="y", rotation=0)
            _first_column_only(ax, "teacher")
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        # room between rows for the rotated student names, so they do not run into the next row's titles
        fig.subplots_adjust(hspace=0.6 + 0.05 * max(len(s) for s in students))
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
        label = f"{metric} (%)" + (" - student alone" if gain else "")
        fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=label)
        k = dict(zip(keys, key))
        what = f"Test {metric.replace('_', ' ')} (%)" + (" gain over the student alone" if gain else "")
        fig.suptitle(f"{what}, mean over seeds: {k['dataset']}, recipe {k['recipe']}, {k['epochs']} epochs", y=1.07)
        paths += _save(fig, out_dir, _slug("gain_heatmap" if gain else "accuracy_heatmap", k["dataset"],
                                           k["recipe"], f"{k['epochs']}ep", k["setting"]))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Overhead bars
# --------------------------------------------------------------------------------------------------------------

_OVERHEAD_PANELS = [("step_time_ms", "train step time (ms)", "step_time_ms_vs_none"),
                    ("peak_memory_mb", "peak memory (MiB)", "peak_memory_mb_vs_none"),
                    ("train_gflops_per_image", "train GFLOPs / image", "train_gflops_per_image_vs_none"),
                    ("extra_params", "extra trainable params (M)", "train_params_vs_none")]


def overhead_bars(runs: pd.DataFrame, out_dir) -> List[Path]:
    _style()
    out_dir = Path(out_dir)
    df = runs[(runs["kind"] == "overhead") & (runs["status"] == "done")].copy()
    if df.empty:
        return []
    keys = ["overhead_teacher", "student", "batch_size", "img_size", "device", "precision"]
    df = keyed(df, keys)
    paths: List[Path] = []
    for key, g in df.groupby(keys):
        k = dict(zip(keys, key))
        g = g.set_index("method")
        methods = _methods(g.index)
        g = g.loc[methods]
        pal = _palette(methods)
        fig, axes = plt.subplots(1, 4, figsize=(4.2 * 4, 0.42 * len(methods) + 1.8), sharey=True)
        y = np.arange(len(methods))
        for ax, (col, label, ratio_col) in zip(axes, _OVERHEAD_PANELS):
            vals = pd.to_numeric(g[col], errors="coerce").to_numpy(dtype=float)
            if col == "extra_params":
                vals = vals / 1e6
            ax.barh(y, np.nan_to_num(vals), color=[pal[m] for m in methods])
            ax.set_title(label, fontsize=12)
            top = np.nanmax(vals) if np.isfinite(vals).any() else 1.0
            ax.set_xlim(0, (top if top > 0 else 1.0) * 1.6)  # room for the value and ratio labels
            ratios = pd.to_numeric(g.get(ratio_col), errors="coerce") if ratio_col in g else None
            for i, m in enumerate(methods):
                v = vals[i]
                if not np.isfinite(v):
                    ax.text(0, i, " n/a", va="center", fontsize=10)
                    continue
                text = f"{v:.0f}" if v >= 100 else f"{v:.3g}"  # 1546, not 1.55e+03
                if ratios is not None and np.isfinite(ratios.iloc[i]):
                    text += f"  ×{ratios.iloc[i]:.2f}"
                ax.text(v, i, " " + text, va="center", fontsize=10)
        axes[0].set_yticks(y)
        axes[0].set_yticklabels(methods)
        axes[0].invert_yaxis()
        fig.suptitle(f"Training cost per method: {k['overhead_teacher']} → {k['student']}, batch {k['batch_size']}, "
                     f"{k['img_size']} px, {k['device']}, {k['precision']}  (×: ratio to the student alone; "
                     "params: student + method)", fontsize=12, y=1.04)
        paths += _save(fig, out_dir, _slug("overhead", k["overhead_teacher"], "to", k["student"],
                                           f"b{k['batch_size']}", f"{k['img_size']}px", k["device"]))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Per-epoch figures
# --------------------------------------------------------------------------------------------------------------

def _pairs(epochs: pd.DataFrame):
    """(teacher, student, dataset, setting) groups of distillation runs, with the student-alone runs attached."""
    df = keyed(epochs[epochs["kind"] == "student"], ["setting"])
    if df.empty:
        return
    distilled = df[df["method"] != BASELINE]
    alone = df[df["method"] == BASELINE]
    for (t, s, d, st), g in distilled.groupby(["teacher", "student", "dataset", "setting"]):
        base = alone[(alone["student"] == s) & (alone["dataset"] == d) & (alone["setting"] == st)]
        yield (t, s, d, st), g, base


def cka_heatmaps(epochs: pd.DataFrame, out_dir) -> List[Path]:
    import seaborn as sns

    _style()
    out_dir = Path(out_dir)
    paths: List[Path] = []
    cka_cols = [c for c in epochs.columns if c.startswith("cka/")]
    if not cka_cols:
        return []
    kernels = sorted({c.split("/")[1] for c in cka_cols})
    for (t, s, d, st), g, _ in _pairs(epochs):
        for kernel in kernels:
            cols = [c for c in cka_cols if c.split("/")[1] == kernel]
            sub = g.dropna(subset=cols, how="all")
            if sub.empty:
                continue
            # the last probed epoch of every run, then the mean over seeds
            last = sub.sort_values("epoch").groupby("run").tail(1)
            methods = _methods(last["method"])
            t_stages = sorted({int(re.match(r"t(\d+)_s(\d+)", c.split("/")[2]).group(1)) for c in cols})
            s_stages = sorted({int(re.match(r"t(\d+)_s(\d+)", c.split("/")[2]).group(2)) for c in cols})
            rows, ncols = _grid(len(methods))
            fig, axes = plt.subplots(rows, ncols, figsize=(3.6 * ncols + 0.8, 3.3 * rows + 0.6), squeeze=False)
            for ax, m in zip(axes.flat, methods):
                mg = last[last["method"] == m]
                grid = pd.DataFrame(np.nan, index=[f"T{i}" for i in t_stages], columns=[f"S{j}" for j in s_stages])
                for i in t_stages:
                    for j in s_stages:
                        col = f"cka/{kernel}/t{i}_s{j}"
                        if col in mg:
                            grid.loc[f"T{i}", f"S{j}"] = pd.to_numeric(mg[col], errors="coerce").mean()
                sns.heatmap(grid, ax=ax, annot=True, fmt=".2f", cmap="magma", vmin=0, vmax=1, cbar=False,
                            square=True, linewidths=0.5, linecolor="white", annot_kws={"fontsize": 10})
                n = mg["run"].nunique()
                ax.set_title(f"{m} (epoch {int(mg['epoch'].max())}, {n} seed{'s' if n > 1 else ''})", fontsize=11)
                ax.set_xlabel(f"student stage ({s})")
                ax.tick_params(axis="y", rotation=0)
                _first_column_only(ax, f"teacher stage ({t})")
            for ax in list(axes.flat)[len(methods):]:
                ax.axis("off")
            sm = plt.cm.ScalarMappable(cmap="magma", norm=plt.Normalize(0, 1))
            fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.8, label=f"CKA ({kernel})")
            fig.suptitle(f"CKA ({kernel} kernel, unbiased HSIC) between teacher and student stages: {t} → {s}, {d}",
                         y=1.03)
            paths += _save(fig, out_dir, _slug("cka", kernel, t, "to", s, d, st))
    return paths


def _band_plot(ax, frame: pd.DataFrame, y: str, pal: Dict[str, tuple], methods: Sequence[str],
               limits: Tuple[float, float] = (-np.inf, np.inf)) -> bool:
    """Mean over seeds per epoch with a +-1 std band, clipped to the quantity's ``limits``."""
    drawn = False
    for m in methods:
        mg = frame[frame["method"] == m][["epoch", y, "run"]].copy()
        mg[y] = pd.to_numeric(mg[y], errors="coerce")
        mg = mg.dropna(subset=[y])
        if mg.empty:
            continue
        stats = mg.groupby("epoch")[y].agg(["mean", "std", "count"]).reset_index()
        n = mg["run"].nunique()
        style = "--" if m == BASELINE else "-"
        label = f"{m} (alone)" if m == BASELINE else m
        ax.plot(stats["epoch"], stats["mean"], style, marker="o", ms=3.5, color=pal[m], lw=2,
                label=f"{label}, n={n}")
        if (stats["count"] > 1).any():
            sd = stats["std"].fillna(0)
            low, high = (stats["mean"] - sd).clip(*limits), (stats["mean"] + sd).clip(*limits)
            ax.fill_between(stats["epoch"], low, high, color=pal[m], alpha=0.18, lw=0)
        drawn = True
    return drawn


def conflict_curves(epochs: pd.DataFrame, out_dir) -> List[Path]:
    _style()
    out_dir = Path(out_dir)
    if "conflict/cosine" not in epochs.columns:
        return []
    panels = [("conflict/cosine", "cosine(g_task, g_distill)", (-1.0, 1.0)),
              ("conflict/fraction", "fraction of steps with cosine < 0", (0.0, 1.0)),
              ("conflict/norm_ratio", "‖g_distill‖ / ‖g_task‖", (0.0, np.inf))]
    paths: List[Path] = []
    for (t, s, d, st), g, _ in _pairs(epochs):
        g = g.dropna(subset=["conflict/cosine"])
        if g.empty:
            continue
        methods = _methods(g["method"])
        pal = _palette(methods)
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
        for ax, (col, label, limits) in zip(axes, panels):
            if col in g:
                _band_plot(ax, g, col, pal, methods, limits)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0].axhline(0, color="black", lw=0.8)
        axes[0].set_ylim(-1.05, 1.05)
        axes[1].set_ylim(-0.03, 1.03)
        ratio = pd.to_numeric(g.get("conflict/norm_ratio"), errors="coerce").dropna()
        if len(ratio) and (ratio > 0).all() and ratio.max() / ratio.min() > 20:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            axes[2].set_yscale("log")
            # 1-2-5 ticks over a few decades, decades alone over a wide range (they would crowd otherwise)
            wide = ratio.max() / ratio.min() > 1e3
            axes[2].yaxis.set_major_locator(LogLocator(subs=(1.0,) if wide else (1.0, 2.0, 5.0)))
            axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axes[2].yaxis.set_minor_formatter(NullFormatter())
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="method")
        fig.suptitle(f"Gradient conflict between the task (CE) and distillation losses on the student: {t} → {s}, "
                     f"{d} (mean ± std over seeds)", y=1.03)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("conflict", t, "to", s, d, st))
    return paths


def convergence_curves(epochs: pd.DataFrame, out_dir) -> List[Path]:
    _style()
    out_dir = Path(out_dir)
    if epochs.empty or "top1" not in epochs.columns:
        return []
    paths: List[Path] = []
    for (t, s, d, st), g, base in _pairs(epochs):
        frame = pd.concat([g, base], ignore_index=True)
        methods = _methods(frame["method"])
        pal = _palette(methods)
        panels = [("top1", "test top-1 (%)"), ("train_loss", "training loss (sum of terms)")]
        if "loss/ce" in frame:
            panels.append(("loss/ce", "task loss (CE term)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4))
        for ax, (col, label) in zip(axes, panels):
            if col in frame:
                _band_plot(ax, frame, col, pal, methods)
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.xaxis.get_major_locator().set_params(integer=True)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="method")
        fig.suptitle(f"Convergence: {t} → {s}, {d} (mean ± std over seeds; dashed: student alone)", y=1.03)
        fig.tight_layout()
        paths += _save(fig, out_dir, _slug("convergence", t, "to", s, d, st))
    return paths


def all_plots(runs: pd.DataFrame, epochs: pd.DataFrame, out_dir) -> Dict[str, List[Path]]:
    """Every figure, by kind."""
    return {"accuracy": accuracy_heatmaps(runs, out_dir), "gain": accuracy_heatmaps(runs, out_dir, gain=True),
            "overhead": overhead_bars(runs, out_dir),
            "cka": cka_heatmaps(epochs, out_dir), "conflict": conflict_curves(epochs, out_dir),
            "convergence": convergence_curves(epochs, out_dir)}
