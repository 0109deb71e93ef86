"""Comparison tables in the papers' layout, drawn from the tidy run table alone.

Rows are teacher -> student pairs, columns the teacher's accuracy (T), the student trained alone (S, method
``none``) and one column per distillation method. A cell is the mean +- sample standard deviation (ddof=1) over
seeds of ``best_top1`` (or another metric), followed by its gain over S (same student, dataset, recipe and
training setting; a ``none`` run has no teacher, so one S run serves every row of its student). The best method of
each row is in bold. One table per (dataset, recipe, epochs, setting): only comparable runs share a table.

Each table is written as Markdown, LaTeX (booktabs) and CSV (tidy: one line per cell with mean, std, n, gain).
Where a public source gives the OFA-KD paper's number for a cell, :func:`published_side_by_side` sets it next to ours.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from .collect import keyed

BASELINE = "none"
PAPER_NAMES = {"swin_tiny": "Swin-T", "vit_small": "ViT-S", "mixer_b16": "Mixer-B/16", "convnext_tiny": "ConvNeXt-T",
               "resnet18": "ResNet18", "mobilenetv2_100": "MobileNetV2", "deit_tiny": "DeiT-T",
               "swin_pico": "Swin-P", "resmlp_12": "ResMLP-S12"}


@dataclass
class Cell:
    mean: float
    std: Optional[float]
    n: int
    gain: Optional[float] = None
    best: bool = False

    def text(self, digits: int = 2, pm: str = " ± ") -> str:
        s = f"{self.mean:.{digits}f}"
        if self.std is not None:
            s += f"{pm}{self.std:.{digits}f}"
        return s


@dataclass
class ComparisonTable:
    title: str
    key: Dict[str, object]
    metric: str
    methods: List[str]
    rows: List[Tuple[str, str]]                                   # (teacher, student)
    teacher_acc: Dict[Tuple[str, str], Optional[Cell]] = field(default_factory=dict)
    student_alone: Dict[str, Optional[Cell]] = field(default_factory=dict)   # by student
    cells: Dict[Tuple[Tuple[str, str], str], Cell] = field(default_factory=dict)
    families: Dict[str, str] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        k = self.key
        return f"{k['dataset']}_{k['recipe']}_{k['epochs']}ep_{k['setting']}".replace("/", "-")

    # -- CSV ------------------------------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        out = []
        for pair in self.rows:
            t, s = pair
            base = {**self.key, "teacher": t, "student": s, "metric": self.metric}
            tc = self.teacher_acc.get(pair)
            if tc is not None:
                out.append({**base, "column": "teacher", "mean": tc.mean, "std": tc.std, "n": tc.n})
            sc = self.student_alone.get(s)
            if sc is not None:
                out.append({**base, "column": BASELINE, "mean": sc.mean, "std": sc.std, "n": sc.n})
            for m in self.methods:
                c = self.cells.get((pair, m))
                if c is not None:
                    out.append({**base, "column": m, "mean": c.mean, "std": c.std, "n": c.n, "gain": c.gain,
                                "best": c.best})
        return pd.DataFrame(out)

    # -- Markdown -------------------------------------------------------------------------------------------------
    def _name(self, model: str) -> str:
        fam = self.families.get(model)
        return f"{model} ({fam})" if fam else model

    def to_markdown(self, digits: int = 2, title: bool = True) -> str:
        head = ["Teacher → Student", "T", "S (alone)"] + self.methods
        lines = ([f"**{self.title}**", ""] if title else []) + ["| " + " | ".join(head) + " |",
                 "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
        for pair in self.rows:
            t, s = pair
            tc, sc = self.teacher_acc.get(pair), self.student_alone.get(s)
            row = [f"{self._name(t)} → {self._name(s)}", tc.text(digits) if tc else "–",
                   sc.text(digits) if sc else "–"]
            for m in self.methods:
                c = self.cells.get((pair, m))
                if c is None:
                    row.append("–")
                    continue
                text = f"**{c.text(digits)}**" if c.best else c.text(digits)
                if c.gain is not None:
                    text += f" ({c.gain:+.{digits}f})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"{_metric_label(self.metric)}: mean ± std over seeds (sample std; no ± with one seed); "
                      "(±x.xx) gain over the student trained alone (S); best method per row in bold. "
                      f"Seeds per cell: {self._seed_counts()}."]
        return "\n".join(lines)

    def _seed_counts(self) -> str:
        ns = sorted({c.n for c in self.cells.values()} | {c.n for c in self.student_alone.values() if c})
        return ", ".join(map(str, ns)) if ns else "–"

    # -- LaTeX ----------------------------------------------------------------------------------------------------
    def to_latex(self, digits: int = 2) -> str:
        cols = "l" + "r" * (2 + len(self.methods))
        head = ["Teacher $\\rightarrow$ Student", "T", "S"] + [_tex(m) for m in self.methods]
        lines = ["% " + self.title, "\\begin{table}[t]", "\\centering", "\\small",
                 f"\\caption{{{_tex(self.title)}. {_tex(_metric_label(self.metric))}: mean $\\pm$ std over seeds; "
                 "gain over the student alone (S) in parentheses; best per row in bold.}",
                 f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
        for pair in self.rows:
            t, s = pair
            tc, sc = self.teacher_acc.get(pair), self.student_alone.get(s)
            row = [f"{_tex(t)} $\\rightarrow$ {_tex(s)}", _tex_cell(tc, digits), _tex_cell(sc, digits)]
            for m in self.methods:
                c = self.cells.get((pair, m))
                if c is None:
                    row.append("--")
                    continue
                text = _tex_cell(c, digits)
                if c.best:
                    text = f"\\textbf{{{text}}}"
                if c.gain is not None:
                    text += f" {{\\scriptsize ({c.gain:+.{digits}f})}}"
                row.append(text)
            lines.append(" & ".join(row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def write(self, out_dir, stem: Optional[str] = None) -> List[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"comparison_{self.slug}"
        paths = [out / f"{stem}.md", out / f"{stem}.tex", out / f"{stem}.csv"]
        paths[0].write_text(self.to_markdown() + "\n")
        paths[1].write_text(self.to_latex())
        self.to_frame().to_csv(paths[2], index=False)
        return paths


def _metric_label(metric: str) -> str:
    return {"best_top1": "best top-1 (%)", "last_top1": "last top-1 (%)", "best_top5": "best top-5 (%)",
            "last_top5": "last top-5 (%)"}.get(metric, metric)


def _tex(s) -> str:
    s = str(s)
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("→", "$\\rightarrow$"), ("±", "$\\pm$")):
        s = s.replace(a, b)
    return s


def _tex_cell(c: Optional[Cell], digits: int) -> str:
    return "--" if c is None else c.text(digits, pm=" $\\pm$ ")


def summarise(values: Sequence[float]) -> Optional[Cell]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return Cell(mean, std, len(vals))


def _training_runs(runs: pd.DataFrame) -> pd.DataFrame:
    df = runs[(runs["kind"] == "student") & (runs["status"] == "done")].copy()
    return df


def comparison_tables(runs: pd.DataFrame, metric: str = "best_top1",
                      methods: Optional[Sequence[str]] = None) -> List[ComparisonTable]:
    """One :class:`ComparisonTable` per (dataset, recipe, epochs, setting) of the finished student runs."""
    df = _training_runs(runs)
    if df.empty:
        return []
    tables = []
    group_keys = ["dataset", "recipe", "epochs", "setting"]
    df = keyed(df, group_keys)
    for key, g in df.groupby(group_keys, sort=True):
        key = dict(zip(group_keys, key))
        distilled = g[g["method"] != BASELINE]
        found = list(dict.fromkeys(sorted(distilled["method"].unique(), key=_method_order)))
        cols = [m for m in (methods or found) if m in found]
        rows = sorted({(t, s) for t, s in zip(distilled["teacher"], distilled["student"])})
        families = {}
        for fam_col, model_col in (("teacher_family", "teacher"), ("student_family", "student")):
            families.update({m: f for m, f in zip(g[model_col], g[fam_col]) if m and isinstance(f, str)})
        table = ComparisonTable(
            title=f"{key['dataset']}, recipe {key['recipe']}, {key['epochs']} epochs (setting {key['setting']})",
            key=key, metric=metric, methods=cols, rows=rows, families=families)
        alone = g[g["method"] == BASELINE]
        for s, sg in alone.groupby("student"):
            table.student_alone[s] = summarise(sg[metric])
        for pair in rows:
            pg = distilled[(distilled["teacher"] == pair[0]) & (distilled["student"] == pair[1])]
            # the teacher's accuracy: one value per distinct teacher run (every student run repeats it)
            table.teacher_acc[pair] = summarise(list(pg["teacher_top1"].dropna().unique()))
            base = table.student_alone.get(pair[1])
            for m in cols:
                mg = pg[pg["method"] == m]
                if mg.empty:
                    continue
                if mg["method_variant"].nunique() > 1:
                    import warnings
                    warnings.warn(f"{m} {pair[0]} -> {pair[1]}: runs with different method settings or teachers "
                                  f"are pooled in one cell ({mg['method_variant'].nunique()} variants)")
                cell = summarise(mg[metric])
                if cell is None:
                    continue
                cell.gain = cell.mean - base.mean if base is not None else None
                table.cells[(pair, m)] = cell
            present = [table.cells[(pair, m)] for m in cols if (pair, m) in table.cells]
            if present:
                best = max(c.mean for c in present)
                for c in present:
                    c.best = c.mean == best
        tables.append(table)
    return tables


_KNOWN_ORDER = ["kd", "dkd", "dist", "fitnet", "ofa", "pat", "hcd", "spofa"]


def _method_order(m: str):
    return (_KNOWN_ORDER.index(m) if m in _KNOWN_ORDER else len(_KNOWN_ORDER), m)


def write_tables(runs: pd.DataFrame, out_dir, metric: str = "best_top1") -> List[Path]:
    paths: List[Path] = []
    for table in comparison_tables(runs, metric):
        paths += table.write(out_dir)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Published numbers side by side
# --------------------------------------------------------------------------------------------------------------

def published_side_by_side(table: ComparisonTable) -> Optional[pd.DataFrame]:
    """Our mean next to the published number of every cell of ``table`` that a public source gives (see
    ``published.py``: only sourced cells exist), with the source and any note; None when there is none."""
    from .published import PAPER, lookup, published_cells

    pub = published_cells()
    dataset = table.key.get("dataset")
    if dataset not in set(pub["dataset"]):
        return None
    out = []
    for pair in table.rows:
        t, s = pair
        entries = [("teacher", table.teacher_acc.get(pair)), (BASELINE, table.student_alone.get(s))]
        entries += [(m, table.cells.get((pair, m))) for m in table.methods if m != BASELINE]
        for column, ours in entries:
            row = lookup(pub, dataset, t, s, column)
            if row is None:
                continue
            out.append({"teacher": t, "student": s, "column": column, "ours": ours.mean if ours else None,
                        "ours_n": ours.n if ours else 0, "published": float(row["top1"]),
                        "delta": (ours.mean - float(row["top1"])) if ours else None, "source": row["source"],
                        "note": row["note"], "paper": PAPER})
    return pd.DataFrame(out) if out else None


def published_markdown(df: pd.DataFrame) -> str:
    from .published import PAPER, SOURCES, source_lines

    lines = [f"| Teacher → Student | column | ours | published ({PAPER}) | ours − published | source |",
             "|:---|:---|---:|---:|---:|:---|"]
    notes = []
    for _, r in df.iterrows():
        ours = f"{r['ours']:.2f}" if r["ours"] is not None and not pd.isna(r["ours"]) else "–"
        delta = f"{r['delta']:+.2f}" if r["delta"] is not None and not pd.isna(r["delta"]) else "–"
        mark = ""
        if r["note"]:
            notes.append(r["note"])
            mark = f" (note {len(notes)})"
        lines.append(f"| {r['teacher']} → {r['student']} | {r['column']} | {ours} | {r['published']:.2f} | "
                     f"{delta} | {SOURCES[r['source']].label}{mark} |")
    lines += ["", "Published numbers, not measured here; only cells that a public source states are shown:"]
    lines += source_lines(dict.fromkeys(df["source"]))
    lines += [f"- note {i}: {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)
