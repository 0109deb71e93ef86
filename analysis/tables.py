"""Comparison tables in the papers' layout, drawn from the tidy run table alone, with their statistics.

Rows are teacher -> student pairs, columns the teacher's accuracy (T), the student trained alone (S, method
``none`` at its defaults) and one column per method label (:mod:`.order`: ``kd``, ``kd[temperature=4]``, ...): runs of
different method settings or teacher trainings never share a cell. One table per (dataset, recipe, epochs, setting):
only comparable runs share a table, its title says what sets its setting apart from the others (``setting_label``).
Every table has four parts (see :mod:`.stats` for the rules):

1. accuracy: mean +- sample std over seeds with the 95 % t interval of the mean; n where a cell has another
   number of seeds than the table's usual one (one seed: no std, no interval);
2. paired difference from the student alone (same student, setting and seed), with its 95 % t interval and its
   t test's p-value after Holm's correction over the table's family of such tests (every method in every pair),
   ``*`` where that corrected p-value is below 0.05; 3. the same from KD (its own family);
4. ranks across pairs: each method's average rank (S included) with a bootstrap interval over pairs and seeds, its
   win/tie/loss counts against S and KD (corrected decisions), Friedman's test and the Nemenyi critical difference.

A cell is bold only where the method beats the student alone under the corrected decision. A ``none`` run
has no teacher, so one S run serves every row of its student. Written as Markdown, LaTeX (booktabs) and CSV (tidy:
one line per cell; ranks in their own CSV). Where a published table (``published.py``) gives a number for a cell,
:func:`published_side_by_side` sets it next to ours, with whether it lies in our seed interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd


from .collect import SETTING_KEYS, keyed
from .order import BASELINE, REFERENCE, method_label, method_of, ordered
from .stats import (ALPHA, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, Estimate, RankTest, by_seed, friedman, holm,
                    mean_interval, outcome, paired_difference, rank_table, ranks_within_pairs, significant,
                    supported_orders, win_tie_loss)

# how a table's runs are paired: runs with a pipeline version (summary "pipeline": every version draws its batches from
# the keyed data stream) share their batches
SEED_PAIRING = ("paired by seed only: runs of one seed share the seed, not their batches (trained before the keyed "
                "stream)")
BATCH_PAIRING = "paired by seed and batch: runs of one seed saw the same batches (common random numbers)"
TIE_RULE = ("win: the paired difference is above 0 and its Holm-corrected p-value below 0.05; loss: the same below 0; "
            "tie: otherwise, or no test (fewer than 2 paired seeds, or the same difference on every seed)")
HOLM_NOTE = ("p: two-sided t test of the seed-paired differences, Holm-corrected over this table's family (every "
             "method in every pair against the same baseline); a difference with fewer than 2 seeds or the same value "
             "on every seed has no test (no spread: the t statistic is undefined) and is never marked")
# the metric a table compares by default: the validation-selected epoch where every run has one, else the last epoch
PRIMARY = "primary"
SELECTED, LAST, BEST = "selected_top1", "last_top1", "best_top1"


@dataclass
class Cell:
    """One cell: the accuracy over seeds and, for a distilled cell, its paired differences from S and KD."""
    acc: Estimate
    by_seed: Dict[int, float] = field(default_factory=dict)
    vs_alone: Optional[Estimate] = None
    vs_kd: Optional[Estimate] = None
    holm_alone: Optional[float] = None      # the Holm-adjusted p-values of vs_alone / vs_kd in their table's family
    holm_kd: Optional[float] = None

    @property
    def mean(self) -> float:
        return self.acc.mean

    @property
    def std(self) -> Optional[float]:
        return self.acc.std

    @property
    def n(self) -> int:
        return self.acc.n

    @property
    def gain(self) -> Optional[float]:
        return self.vs_alone.mean if self.vs_alone is not None else None

    @property
    def beats_baseline(self) -> bool:
        return outcome(self.vs_alone, self.holm_alone) == "win"

    def test(self, base: str) -> Tuple[Optional[Estimate], Optional[float]]:
        """The difference from ``base`` (S or KD) with its adjusted p-value."""
        return (self.vs_alone, self.holm_alone) if base == BASELINE else (self.vs_kd, self.holm_kd)

    def text(self, digits: int = 2, pm: str = " ± ", usual_n: Optional[int] = None) -> str:
        a = self.acc
        if a.n == 1:
            return f"{a.mean:.{digits}f} (1 seed)"
        s = f"{a.mean:.{digits}f}{pm}{a.std:.{digits}f} [{a.low:.{digits}f}, {a.high:.{digits}f}]"
        return s + (f" (n={a.n})" if usual_n is not None and a.n != usual_n else "")


def signed(value: float, digits: int = 2) -> str:
    """``+1.20``, ``-0.30``; a value that rounds to zero is ``0.00``, never ``-0.00``."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def p_text(p: Optional[float]) -> str:
    return "no test" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def difference_text(d: Optional[Estimate], digits: int = 2, adjusted: Optional[float] = None,
                    show_p: bool = False) -> str:
    """``+1.20 [-0.30, +2.70]*``: a paired difference, its 95 % interval, ``*`` where its adjusted p-value
    (``adjusted``) is below 0.05; ``show_p``: the adjusted p-value after it."""
    if d is None:
        return "–"
    if d.n == 1:
        return f"{signed(d.mean, digits)} (1 seed)"
    text = f"{signed(d.mean, digits)} [{signed(d.low, digits)}, {signed(d.high, digits)}]"
    text += "*" if significant(d, adjusted) else ""
    return text + (f" ({p_text(adjusted)})" if show_p else "")


@dataclass
class ComparisonTable:
    title: str
    key: Dict[str, object]                                        # SETTING_KEYS: what the table's runs share
    metric: str
    methods: List[str]                                            # the column labels (.order), in order
    rows: List[Tuple[str, str]]                                   # (teacher, student)
    # by pair, the teacher's accuracy per teacher setup (teacher_label; '' where the pair's teachers do not differ)
    teacher_acc: Dict[Tuple[str, str], Dict[str, Cell]] = field(default_factory=dict)
    student_alone: Dict[str, Optional[Cell]] = field(default_factory=dict)   # by student
    cells: Dict[Tuple[Tuple[str, str], str], Cell] = field(default_factory=dict)
    families: Dict[str, str] = field(default_factory=dict)
    batch_paired: bool = False                                    # every run drew its batches from the keyed stream
    setting_label: str = ""                                       # what sets this setting apart (collect)

    @property
    def pairing_note(self) -> str:
        return BATCH_PAIRING if self.batch_paired else SEED_PAIRING

    @property
    def slug(self) -> str:
        k = self.key
        return f"{k['dataset']}_{k['recipe']}_{k['epochs']}ep_{k['setting']}".replace("/", "-")

    # -- statistics across pairs ----------------------------------------------------------------------------------
    def scores(self) -> pd.DataFrame:
        """Mean metric per pair (rows) and column (S as ``none``, then the methods): what is ranked."""
        cols = [BASELINE] + self.methods
        out = pd.DataFrame(index=pd.MultiIndex.from_tuples(self.rows, names=["teacher", "student"]), columns=cols,
                           dtype=float)
        for pair in self.rows:
            alone = self.student_alone.get(pair[1])
            out.loc[pair, BASELINE] = alone.mean if alone else float("nan")
            for m in self.methods:
                c = self.cells.get((pair, m))
                out.loc[pair, m] = c.mean if c else float("nan")
        return out

    def seed_values(self) -> Dict[Tuple[str, str], Dict[str, Dict[int, float]]]:
        """Per pair, per column (S as ``none``), the values by seed behind each mean: what the rank bootstrap
        resamples."""
        out = {}
        for pair in self.rows:
            alone = self.student_alone.get(pair[1])
            out[pair] = {BASELINE: alone.by_seed if alone else {}}
            out[pair].update({m: self.cells[(pair, m)].by_seed for m in self.methods if (pair, m) in self.cells})
        return out

    def ranks(self) -> pd.DataFrame:
        """Average rank with its bootstrap interval (pairs and seeds), and win/tie/loss against S and KD under the
        corrected decisions, per column."""
        table = rank_table(self.scores(), per_seed=self.seed_values())
        for base in (BASELINE, REFERENCE):
            wtl = {m: win_tie_loss(self.cells[(p, m)].test(base) for p in self.rows if (p, m) in self.cells)
                   for m in self.methods if m != base}
            table[f"wtl_vs_{base}"] = [("%d/%d/%d" % wtl[m]) if m in wtl else "–" for m in table.index]
        return table.sort_values("mean_rank", kind="stable")

    def rank_test(self) -> Optional[RankTest]:
        """Friedman's test over the pairs with every column, and the Nemenyi critical difference."""
        return friedman(ranks_within_pairs(self.scores()))

    def apply_holm(self) -> None:
        """Holm's correction over each family of the table: every cell's test against S, and against KD."""
        for attr, target in (("vs_alone", "holm_alone"), ("vs_kd", "holm_kd")):
            cells = [c for c in self.cells.values() if getattr(c, attr) is not None]
            for c, p in zip(cells, holm([getattr(c, attr).p for c in cells])):
                setattr(c, target, p)

    def usual_n(self) -> Optional[int]:
        ns = [c.n for c in self.cells.values()] + [c.n for c in self.student_alone.values() if c]
        return max(set(ns), key=ns.count) if ns else None

    # -- CSV ------------------------------------------------------------------------------------------------------
    def to_frame(self) -> pd.DataFrame:
        out = []
        for pair in self.rows:
            t, s = pair
            base = {**self.key, "setting_label": self.setting_label, "teacher": t, "student": s,
                    "metric": self.metric}
            entries = [(method_label("teacher", [label] if label else []), c)
                       for label, c in sorted(self.teacher_acc.get(pair, {}).items())]
            entries += [(BASELINE, self.student_alone.get(s))] + [(m, self.cells.get((pair, m))) for m in self.methods]
            for column, c in entries:
                if c is None:
                    continue
                method = method_of(column)
                row = {**base, "column": column, "method": method if method != "teacher" else None,
                       "mean": c.mean, "std": c.std, "n": c.n, "ci_low": c.acc.low,
                       "ci_high": c.acc.high}
                for name, d, adjusted in (("vs_none", c.vs_alone, c.holm_alone), ("vs_kd", c.vs_kd, c.holm_kd)):
                    row.update({f"{name}": d.mean if d else None, f"{name}_low": d.low if d else None,
                                f"{name}_high": d.high if d else None, f"{name}_n": d.n if d else None,
                                f"{name}_p": d.p if d else None, f"{name}_p_holm": adjusted})
                row["beats_none"] = c.beats_baseline if column in self.methods else None
                out.append(row)
        return pd.DataFrame(out)

    # -- Markdown -------------------------------------------------------------------------------------------------
    def _name(self, model: str) -> str:
        fam = self.families.get(model)
        return f"{model} ({fam})" if fam else model

    def _grid(self, head: List[str], body: List[List[str]]) -> List[str]:
        return (["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
                + ["| " + " | ".join(row) + " |" for row in body])

    def _pair_name(self, pair) -> str:
        return f"{self._name(pair[0])} → {self._name(pair[1])}"

    def teacher_text(self, pair, digits: int = 2) -> str:
        """The T cell: the teacher's accuracy, per teacher setup where the pair's runs had teachers trained otherwise
        (``80.00; train.epochs=7: 85.00``)."""
        cells = sorted(self.teacher_acc.get(pair, {}).items())
        return "; ".join((f"{label}: " if label else "") + f"{c.mean:.{digits}f}" for label, c in cells) or "–"

    def accuracy_markdown(self, digits: int = 2, bold: bool = True) -> List[str]:
        n = self.usual_n()
        body = []
        for pair in self.rows:
            sc = self.student_alone.get(pair[1])
            row = [self._pair_name(pair), self.teacher_text(pair, digits), sc.text(digits, usual_n=n) if sc else "–"]
            for m in self.methods:
                c = self.cells.get((pair, m))
                text = c.text(digits, usual_n=n) if c else "–"
                row.append(f"**{text}**" if bold and c is not None and c.beats_baseline else text)
            body.append(row)
        return self._grid(["Teacher → Student", "T", "S (alone)"] + self.methods, body) + [
            "", f"{_metric_label(self.metric)}: mean ± std [95 % t interval of the mean] over seeds, {n} seeds per "
                f"cell unless marked (n=...); a cell with one seed has no std and no interval. T: the teacher's "
                f"top-1 (one value per teacher run)."
                + (" Bold: the method beats the student alone (its Holm-corrected test below)." if bold else "")
                + self._labels_note()]

    def _labels_note(self) -> str:
        if all(m == method_of(m) for m in self.methods):
            return ""
        return (" Columns: a method at its defaults, or in brackets what sets its runs apart: its hyperparameters "
                "away from the method's defaults, and after `teacher:` how its teacher was trained where that differs "
                "within this table.")

    def difference_markdown(self, base: str, digits: int = 2) -> List[str]:
        methods = [m for m in self.methods if m != base]
        body = []
        for pair in self.rows:
            row = [self._pair_name(pair)]
            for m in methods:
                c = self.cells.get((pair, m))
                d, adjusted = c.test(base) if c else (None, None)
                text = difference_text(d, digits, adjusted, show_p=True)
                row.append(f"**{text}**" if c is not None and base == BASELINE and c.beats_baseline else text)
            body.append(row)
        what = "the student alone (S)" if base == BASELINE else "KD"
        return self._grid(["Teacher → Student"] + methods, body) + [
            "", f"Paired difference from {what} in {_metric_label(self.metric)} points: mean over seeds of (method − "
                f"{base}) [95 % t interval, not corrected], {self.pairing_note}; {HOLM_NOTE}; * where the corrected "
                "p-value is below 0.05" + ("; bold where that difference is above 0." if base == BASELINE else ".")]

    def ranks_markdown(self, digits: int = 2) -> List[str]:
        ranks = self.ranks()
        if ranks.empty:
            return ["No pair has every method: no ranks."]
        body = [[m if m != BASELINE else "none (S)", f"{r.mean_rank:.{digits}f} [{r.low:.{digits}f}, "
                 f"{r.high:.{digits}f}]", f"{100 * r.first:.0f} %", r.wtl_vs_none, r.wtl_vs_kd]
                for m, r in ranks.iterrows()]
        pairs = int(ranks["pairs"].iloc[0])
        return self._grid(["method", f"average rank over {pairs} pairs [95 % bootstrap]", "ranked first",
                           "W/T/L vs S", "W/T/L vs KD"], body) + [
            "", f"Rank 1 = the highest mean {_metric_label(self.metric)} within a pair, S included, ties share the "
                f"mean of their ranks; only pairs with every method are ranked. Interval: percentile bootstrap that "
                f"draws the pairs and, within each drawn pair, its seeds, with replacement ({BOOTSTRAP_RESAMPLES} "
                f"resamples, seed {BOOTSTRAP_SEED}); ranked first: the share of resamples in which the method ranks "
                f"best (ties included). W/T/L counts pairs; {TIE_RULE}.", ""] + rank_test_lines(self.rank_test(), ranks)

    def to_markdown(self, digits: int = 2, title: bool = True) -> str:
        lines = [f"**{self.title}**", ""] if title else []
        lines += ["Accuracy:", ""] + self.accuracy_markdown(digits)
        lines += ["", "Paired difference from the student alone:", ""] + self.difference_markdown(BASELINE, digits)
        if REFERENCE in self.methods and len(self.methods) > 1:
            lines += ["", "Paired difference from KD:", ""] + self.difference_markdown(REFERENCE, digits)
        lines += ["", "Ranks across pairs:", ""] + self.ranks_markdown(digits)
        return "\n".join(lines)

    # -- LaTeX ----------------------------------------------------------------------------------------------------
    def to_latex(self, digits: int = 2) -> str:
        cols = "l" + "r" * (2 + len(self.methods))
        head = ["Teacher $\\rightarrow$ Student", "T", "S"] + [_tex(m) for m in self.methods]
        lines = ["% " + self.title, "\\begin{table}[t]", "\\centering", "\\small",
                 f"\\caption{{{_tex(self.title)}. {_tex(_metric_label(self.metric))}: mean $\\pm$ std over seeds "
                 f"($n={self.usual_n()}$ unless marked); in parentheses the paired difference from the student "
                 f"alone (S) with its 95\\% t interval ({_tex(self.pairing_note)}); bold: the difference is above 0 "
                 "and its t test's p-value, Holm-corrected over the table's cells, below 0.05.}",
                 f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
        for pair in self.rows:
            t, s = pair
            row = [f"{_tex(t)} $\\rightarrow$ {_tex(s)}", _tex(self.teacher_text(pair, digits)),
                   _tex_cell(self.student_alone.get(s), digits)]
            for m in self.methods:
                c = self.cells.get((pair, m))
                if c is None:
                    row.append("--")
                    continue
                text = _tex_cell(c, digits)
                if c.beats_baseline:
                    text = f"\\textbf{{{text}}}"
                if c.vs_alone is not None:
                    text += f" {{\\scriptsize ({_tex(difference_text(c.vs_alone, digits, c.holm_alone))})}}"
                row.append(text)
            lines.append(" & ".join(row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def write(self, out_dir, stem: Optional[str] = None) -> List[Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"comparison_{self.slug}"
        paths = [out / f"{stem}.md", out / f"{stem}.tex", out / f"{stem}.csv", out / f"ranks_{self.slug}.csv",
                 out / f"rank_test_{self.slug}.csv"]
        paths[0].write_text(self.to_markdown() + "\n")
        paths[1].write_text(self.to_latex())
        self.to_frame().to_csv(paths[2], index=False)
        self.ranks().rename_axis("method").to_csv(paths[3])
        test = self.rank_test()
        pd.DataFrame([vars(test)] if test else [], columns=list(RankTest.__dataclass_fields__)).to_csv(
            paths[4], index=False)
        return paths


def rank_test_lines(test: Optional[RankTest], ranks: pd.DataFrame) -> List[str]:
    """Friedman's test, the critical difference and the orders they support (``ranks``: ComparisonTable.ranks), in
    words: the only orders a table states."""
    if test is None:
        return ["Friedman's test needs at least 2 pairs with every method: no order is tested."]
    name = {BASELINE: "none (S)"}
    lines = [f"Friedman's test over {test.pairs} pairs and {test.methods} methods: chi² = {test.chi2:.2f} "
             f"(p = {test.p_chi2:.3g}), Iman–Davenport F = {test.f:.2f} (p = {test.p_f:.3g}); Nemenyi critical "
             f"difference at α = {ALPHA:.2f}: {test.cd:.2f} ranks (q = {test.q:.3f})."]
    orders = supported_orders(ranks["mean_rank"].to_dict(), test)
    if not test.rejects:
        return lines + ["", "The F test does not reject that every method ranks alike: no order between "
                            "methods is supported."]
    if not orders:
        return lines + ["", "The F test rejects that every method ranks alike, but no two average ranks differ by "
                            "more than the critical difference: no order between two methods is supported."]
    return lines + ["", "Orders the Nemenyi test supports (average ranks further apart than the critical "
                        "difference): " + "; ".join(f"{name.get(a, a)} above {name.get(b, b)}"
                                                    for a, b in orders) + ". No other order is supported."]


def _metric_label(metric: str) -> str:
    return {SELECTED: "top-1 (%) at the validation-selected epoch", LAST: "last-epoch top-1 (%)",
            BEST: "best test top-1 (%, the papers' convention: the epoch chosen on the test set)",
            "best_top5": "best test top-5 (%, epoch chosen on the test set)",
            "last_top5": "last-epoch top-5 (%)"}.get(metric, metric)


def metric_words(metric: str) -> str:
    """What a table or figure compares, in words (the papers' test-selected best says so)."""
    return _metric_label(metric)


def primary_metric(runs: pd.DataFrame) -> str:
    """``selected_top1`` where every one of ``runs`` has it (trained with ``data.val_split``), else ``last_top1``:
    never an epoch chosen on the test set."""
    if SELECTED in runs.columns and len(runs) and runs[SELECTED].notna().all():
        return SELECTED
    return LAST


def _tex(s) -> str:
    s = str(s)
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("→", "$\\rightarrow$"), ("±", "$\\pm$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def _tex_cell(c: Optional[Cell], digits: int) -> str:
    if c is None:
        return "--"
    if c.n == 1:
        return f"{c.mean:.{digits}f}$^1$"
    return f"{c.mean:.{digits}f} $\\pm$ {c.std:.{digits}f}"


def _cell(frame: pd.DataFrame, metric: str) -> Optional[Cell]:
    seeds = by_seed(frame, metric)
    acc = mean_interval(seeds.values())
    return Cell(acc, seeds) if acc is not None else None


def _training_runs(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["kind"] == "student") & (runs["status"] == "done")].copy()


def comparison_tables(runs: pd.DataFrame, metric: str = PRIMARY,
                      methods: Optional[Sequence[str]] = None) -> List[ComparisonTable]:
    """One :class:`ComparisonTable` per (dataset, recipe, epochs, setting) of the finished student runs. ``metric``:
    a summary column, or ``primary`` (:func:`primary_metric`, per table). ``methods``: the columns to show, in that
    order, each a label or a method (all its labels)."""
    df = _training_runs(runs)
    if df.empty:
        return []
    tables = []
    df = keyed(df, SETTING_KEYS)
    for key, g in df.groupby(SETTING_KEYS, sort=True):
        key = dict(zip(SETTING_KEYS, key))
        distilled = g[g["method"] != BASELINE]
        rows = sorted({(t, s) for t, s in zip(distilled["teacher"], distilled["student"])})
        families = {}
        for fam_col, model_col in (("teacher_family", "teacher"), ("student_family", "student")):
            families.update({m: f for m, f in zip(g[model_col], g[fam_col]) if m and isinstance(f, str)})
        setting = g["setting_label"].iloc[0] or ""
        chosen = primary_metric(g) if metric == PRIMARY else metric
        table = ComparisonTable(
            title=f"{key['dataset']}, recipe {key['recipe']}, {key['epochs']} epochs" + (f"; {setting}" if setting
                                                                                         else ""),
            key=key, metric=chosen, methods=_columns(g, methods), rows=rows, families=families,
            batch_paired=bool(len(g)) and g.get("pipeline", pd.Series(dtype=object)).notna().all(),
            setting_label=setting)
        for s, sg in g[g["method_label"] == BASELINE].groupby("student"):
            table.student_alone[s] = _cell(sg, chosen)
        for pair in rows:
            pg = distilled[(distilled["teacher"] == pair[0]) & (distilled["student"] == pair[1])]
            table.teacher_acc[pair] = _teacher_cells(pg)
            _fill_pair(table, pair, g, chosen)
        table.apply_holm()
        tables.append(table)
    return tables


def _teacher_cells(pg: pd.DataFrame) -> Dict[str, Cell]:
    """A pair's teacher accuracy per teacher setup: one value per teacher run (every student run repeats its
    teacher's); two teacher runs of the same accuracy are two values. Runs that name no teacher run (a teacher from
    a checkpoint or stored before ``teacher_run``) count one teacher per weights and accuracy."""
    out = {}
    for label, tg in pg.groupby("teacher_label"):
        tg = tg.dropna(subset=["teacher_top1"])
        nothing = pd.Series(None, index=tg.index, dtype=object)
        teacher_runs, weights = tg.get("teacher_run", nothing), tg.get("teacher_weights", nothing)
        keys = [run if isinstance(run, str) else ("unnamed", w, acc)
                for run, w, acc in zip(teacher_runs, weights, tg["teacher_top1"])]
        values = dict(zip(keys, tg["teacher_top1"]))
        acc = mean_interval(values.values())
        if acc is not None:
            out[label] = Cell(acc)
    return out


def _columns(g: pd.DataFrame, wanted: Optional[Sequence[str]]) -> List[str]:
    """Every label of the table's runs but S's (the student alone at its defaults), in label order; ``wanted``:
    those it names (a label, or a method for all its labels), in its order."""
    found = ordered(label for label in g["method_label"] if label != BASELINE)
    if not wanted:
        return found
    return [label for w in wanted for label in found if w in (label, method_of(label))]


def _cell_runs(g: pd.DataFrame, pair, label: str) -> pd.DataFrame:
    """The runs of one cell: of the pair, or, for a variant of the student alone (no teacher), of the student."""
    runs = g[(g["method_label"] == label) & (g["student"] == pair[1])]
    return runs if method_of(label) == BASELINE else runs[runs["teacher"] == pair[0]]


def _fill_pair(table: ComparisonTable, pair, g: pd.DataFrame, metric: str) -> None:
    """The cells of one pair (one label each: runs of different settings are never pooled), then their paired
    differences from S and from KD."""
    for m in table.methods:
        cell = _cell(_cell_runs(g, pair, m), metric)
        if cell is not None:
            table.cells[(pair, m)] = cell
    alone, kd = table.student_alone.get(pair[1]), table.cells.get((pair, REFERENCE))
    for m in table.methods:
        cell = table.cells.get((pair, m))
        if cell is None:
            continue
        cell.vs_alone = paired_difference(cell.by_seed, alone.by_seed) if alone else None
        cell.vs_kd = paired_difference(cell.by_seed, kd.by_seed) if kd and m != REFERENCE else None


# --------------------------------------------------------------------------------------------------------------
# Published numbers side by side
# --------------------------------------------------------------------------------------------------------------

TOP1_METRICS = (SELECTED, "best_top1", "last_top1")  # what a published top-1 can be set beside
BAND_RULE = ("seed interval: the 95 % t interval of our mean over seeds; the published value lies inside it, above or "
             "below it (a cell of one seed has none)")


def published_side_by_side(table: ComparisonTable, cells: Optional[pd.DataFrame] = None) -> Optional[pd.DataFrame]:
    """Our cell (mean, std, seed interval, n) next to every published value of it in ``cells`` (``published.py``:
    the shipped table by default), with whether the value lies in our seed interval, its source and any note; None
    when no cell of ``table`` has a published value, or when the table compares other than top-1."""
    from .published import lookup, published_cells

    if table.metric not in TOP1_METRICS:
        return None
    cells = published_cells() if cells is None else cells
    dataset = table.key.get("dataset")
    out = []
    for pair in table.rows:
        # the published teacher is the one the pair's runs share (none where they had teachers trained otherwise)
        entries = [("teacher", table.teacher_acc.get(pair, {}).get("")), (BASELINE, table.student_alone.get(pair[1]))]
        entries += [(m, table.cells.get((pair, m))) for m in table.methods if m != BASELINE]
        for column, ours in entries:
            for _, row in lookup(cells, dataset, *pair, column).iterrows():
                out.append(_side_row(pair, column, ours, row))
    return pd.DataFrame(out) if out else None


def _side_row(pair, column: str, ours: Optional[Cell], row) -> Dict[str, object]:
    acc = ours.acc if ours else None
    return {"teacher": pair[0], "student": pair[1], "column": column, "ours": acc.mean if acc else None,
            "ours_std": acc.std if acc else None, "ours_low": acc.low if acc else None,
            "ours_high": acc.high if acc else None, "ours_n": acc.n if acc else 0, "published": row["value"],
            "delta": (acc.mean - row["value"]) if acc else None, "in_seed_interval": seed_band(acc, row["value"]),
            "source": row["source"], "quoted_by": row["quoted_by"], "paper": row["paper"], "note": row["note"]}


def seed_band(acc, published: float) -> str:
    """Where a published value lies against our seed interval: inside, above, below; or why there is no answer."""
    if acc is None:
        return "not run"
    if acc.low is None:
        return "one seed: no interval"
    return "inside" if acc.low <= published <= acc.high else ("above" if published > acc.high else "below")


def published_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    """The side-by-side table, its sources numbered once each ([1], ...), and its notes."""
    from .published import source_text

    lines = ["| Teacher → Student | column | ours | published | ours − published | published vs our seed interval "
             "| source |", "|:---|:---|---:|---:|---:|:---|:---|"]
    sources: Dict[str, int] = {}
    notes: Dict[str, int] = {}
    for _, r in df.iterrows():
        cite = f"[{sources.setdefault(source_text(r), len(sources) + 1)}]"
        if r["note"]:
            cite += f" (note {notes.setdefault(r['note'], len(notes) + 1)})"
        delta = "–" if r["delta"] is None or pd.isna(r["delta"]) else f"{r['delta']:+.{digits}f}"
        lines.append(f"| {r['teacher']} → {r['student']} | {r['column']} | {_ours_text(r, digits)} | "
                     f"{r['published']:.{digits}f} | {delta} | {r['in_seed_interval']} | {cite} |")
    lines += ["", f"Ours: mean ± std [95 % t interval] (n seeds). Published numbers, not measured here; {BAND_RULE}.",
              "", "Sources:", ""]
    lines += [f"- [{i}] {text}" for text, i in sources.items()]
    lines += [f"- note {i}: {text}" for text, i in notes.items()]
    return "\n".join(lines)


def _ours_text(r, digits: int) -> str:
    if r["ours"] is None or pd.isna(r["ours"]):
        return "–"
    if r["ours_n"] == 1:
        return f"{r['ours']:.{digits}f} (1 seed)"
    return (f"{r['ours']:.{digits}f} ± {r['ours_std']:.{digits}f} [{r['ours_low']:.{digits}f}, "
            f"{r['ours_high']:.{digits}f}] (n={r['ours_n']})")
