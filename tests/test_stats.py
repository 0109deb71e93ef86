"""The statistics of the tables and figures against values computed by hand (t table: df 1 12.7062, df 2 4.3027) and
against independent implementations (scipy, statsmodels)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp
from statsmodels.stats.multitest import multipletests

from hkdbench.analysis.collect import collect_runs
from hkdbench.analysis.overhead_table import print_overhead_table
from hkdbench.analysis.stats import (Estimate, chi2_sf, f_sf, friedman, holm, mean_interval, nemenyi_q, outcome,
                                     paired_difference, rank_table, ranks_within_pairs, supported_orders, t_quantile,
                                     win_tie_loss)
from hkdbench.analysis.tables import comparison_tables, primary_metric, signed

from test_analysis import store, write_run  # noqa: F401  (the synthetic run store fixture)

T1, T2 = 12.7062, 4.3027


@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (30, 2.0423)])
def test_t_quantile_matches_the_t_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0.5 <= p < 1 and df >= 1"):
        t_quantile(0.3, 2)


def test_mean_interval_by_hand():
    two = mean_interval([60.0, 62.0])          # std sqrt(2), half width 12.7062 * sqrt(2) / sqrt(2)
    assert (two.mean, two.std, two.n) == (61.0, pytest.approx(math.sqrt(2)), 2)
    assert (two.low, two.high) == (pytest.approx(61 - T1, abs=1e-3), pytest.approx(61 + T1, abs=1e-3))
    three = mean_interval([64.0, 66.0, 68.0, float("nan")])   # NaN dropped; std 2, half 4.3027 * 2 / sqrt(3)
    half = T2 * 2 / math.sqrt(3)
    assert three.n == 3 and three.low == pytest.approx(66 - half, abs=1e-3)
    one = mean_interval([61.0])
    assert one == Estimate(61.0, None, 1, None, None) and not one.excludes_zero
    assert mean_interval([]) is None


def test_paired_difference_uses_shared_seeds_only():
    # seed 2 has no baseline run: dropped; differences 10 and 12
    d = paired_difference({0: 70.0, 1: 74.0, 2: 99.0}, {0: 60.0, 1: 62.0, 5: 0.0})
    assert (d.mean, d.n) == (11.0, 2) and d.std == pytest.approx(math.sqrt(2))
    assert d.low == pytest.approx(11 - T1, abs=1e-3) and not d.excludes_zero and outcome(d, d.p) == "tie"
    assert d.p == pytest.approx(sp.ttest_rel([70.0, 74.0], [60.0, 62.0]).pvalue, rel=1e-9)
    # the same gap on every seed: a zero-width interval that "excludes" 0, but no spread, so no test: never a win
    same = paired_difference({0: 64.0, 1: 66.0}, {0: 60.0, 1: 62.0})
    assert same.excludes_zero and same.p is None and outcome(same, holm([same.p])[0]) == "tie"
    # differences stored to 0.05 points leave a float residue, not a spread
    assert paired_difference({0: 33.15, 1: 34.35}, {0: 33.05, 1: 34.25}).p is None
    loss = paired_difference({0: 50.0, 1: 51.0, 2: 52.0}, {0: 60.0, 1: 60.0, 2: 60.0})
    assert loss.high == pytest.approx(-9 + T2 * 1 / math.sqrt(3), abs=1e-3) and outcome(loss, loss.p) == "loss"
    assert loss.p == pytest.approx(sp.ttest_1samp([-10.0, -9.0, -8.0], 0.0).pvalue, rel=1e-9)
    one = paired_difference({0: 70.0}, {0: 60.0})
    assert one.p is None and outcome(one, None) == "tie"  # one paired seed: no interval, no test
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert win_tie_loss([(loss, loss.p), (d, d.p), (None, None), (same, None)]) == (0, 3, 1)
    assert win_tie_loss([(loss, 0.2)]) == (0, 1, 0)  # the corrected p-value decides, not the raw interval


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_t_test_p_values_match_scipy(n):
    rng = np.random.default_rng(n)
    method, base = rng.normal(70, 2, n), rng.normal(69, 2, n)
    d = paired_difference(dict(enumerate(method)), dict(enumerate(base)))
    assert d.p == pytest.approx(sp.ttest_rel(method, base).pvalue, rel=1e-8)
    lo, hi = sp.t.interval(0.95, n - 1, loc=d.mean, scale=d.std / math.sqrt(n))
    assert (d.low, d.high) == (pytest.approx(lo, abs=1e-9), pytest.approx(hi, abs=1e-9))


def test_holm_by_hand_and_against_statsmodels():
    # Holm (1979)'s step-down by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04,
    # then made monotone -> 0.02, 0.03, 0.06, 0.06; a None (no test) is not counted in the family
    assert holm([0.01, 0.04, 0.03, 0.005, None]) == pytest.approx([0.03, 0.06, 0.06, 0.02, None])
    assert holm([]) == [] and holm([None]) == [None] and holm([0.7, 0.9]) == [1.0, 1.0]
    rng = np.random.default_rng(0)
    for m in (1, 2, 7, 48):
        p = rng.uniform(0, 0.2, m) ** 2
        reject, adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
        assert holm(list(p)) == pytest.approx(list(adjusted), rel=1e-12)
        assert [a < 0.05 for a in holm(list(p))] == list(reject)


def test_friedman_and_iman_davenport_against_scipy():
    rng = np.random.default_rng(1)
    scores = pd.DataFrame(rng.normal(size=(6, 5)) + np.arange(5), columns=list("abcde"))
    scores.iloc[0, 1] = scores.iloc[0, 2]                        # a tie inside a pair: the ties correction
    test = friedman(ranks_within_pairs(scores))
    ref = sp.friedmanchisquare(*[scores[c] for c in scores])
    assert (test.chi2, test.p_chi2) == (pytest.approx(ref.statistic, rel=1e-12), pytest.approx(ref.pvalue, rel=1e-9))
    n, k = scores.shape
    f = (n - 1) * ref.statistic / (n * (k - 1) - ref.statistic)
    assert test.f == pytest.approx(f, rel=1e-12)
    assert test.p_f == pytest.approx(sp.f.sf(f, k - 1, (k - 1) * (n - 1)), rel=1e-8)
    assert test.cd == pytest.approx(nemenyi_q(5) * math.sqrt(5 * 6 / 36), rel=1e-12)
    for x, df in ((0.5, 1), (3.5, 4), (30.0, 5), (80.0, 8)):
        assert chi2_sf(x, df) == pytest.approx(sp.chi2.sf(x, df), rel=1e-9)
    assert f_sf(2.5, 3, 15) == pytest.approx(sp.f.sf(2.5, 3, 15), rel=1e-9)
    assert friedman(ranks_within_pairs(scores.iloc[:1])) is None   # one pair: no test


@pytest.mark.parametrize("k, demsar", [(2, 1.960), (3, 2.343), (4, 2.569), (5, 2.728), (6, 2.850), (10, 3.164)])
def test_nemenyi_q_matches_demsar_and_the_studentized_range(k, demsar):
    assert nemenyi_q(k) == pytest.approx(demsar, abs=1e-3)                      # Demsar 2006, Table 5(a)
    assert nemenyi_q(k) == pytest.approx(sp.studentized_range.ppf(0.95, k, np.inf) / math.sqrt(2), rel=1e-6)


def test_orders_only_where_friedman_rejects_and_ranks_differ_by_the_cd():
    # every pair ranks a > b > c > d: F rejects; CD with 8 pairs and 4 methods = 2.569 * sqrt(20 / 48) = 1.658
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 8, columns=list("abcd"))
    test = friedman(ranks_within_pairs(scores))
    assert test.rejects and test.cd == pytest.approx(2.569 * math.sqrt(20 / 48), abs=1e-3)
    means = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert supported_orders(means, test) == [("a", "c"), ("a", "d"), ("b", "d")]
    # two pairs that disagree: F does not reject, so no order at all is supported
    flat = friedman(ranks_within_pairs(pd.DataFrame([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], columns=list("abc"))))
    assert not flat.rejects and supported_orders({"a": 1.0, "b": 2.0, "c": 3.0}, flat) == []


def test_ranks_average_ties_and_skip_incomplete_pairs():
    scores = pd.DataFrame({"a": [3.0, 1.0, 5.0], "b": [2.0, 2.0, 4.0], "c": [1.0, 2.0, float("nan")]},
                          index=["p1", "p2", "p3"])
    ranks = ranks_within_pairs(scores)
    assert list(ranks.index) == ["p1", "p2"]                     # p3 lacks c
    assert ranks.loc["p2"].tolist() == [3.0, 1.5, 1.5]           # b and c tie for ranks 1 and 2
    table = rank_table(scores)
    assert table["mean_rank"].tolist() == [2.0, 1.75, 2.25] and (table["pairs"] == 2).all()
    # two pairs: a resample is (p1, p1), a mix, or (p2, p2), each end with probability 1/4 > 2.5 %
    assert table.loc["a", ["low", "high"]].tolist() == [1.0, 3.0]
    assert table.loc["b", ["low", "high"]].tolist() == [1.5, 2.0]
    assert rank_table(scores).equals(table)                      # fixed seed: the same interval every time


def test_rank_bootstrap_resamples_the_seeds_within_pairs():
    # one pair, two seeds: a = {10, 0}, b = {5, 5}: the means tie (rank 1.5 each), so over pairs alone the interval
    # is [1.5, 1.5]; drawing the seeds, (0, 0) puts a first, (1, 1) b first and a mix keeps the tie: a's rank is 1,
    # 1.5 or 2 with probabilities 1/4, 1/2, 1/4, so its interval is [1, 2] and it ranks first (ties included) 3/4
    scores = pd.DataFrame({"a": [5.0], "b": [5.0]}, index=["p"])
    pairs_only = rank_table(scores)
    assert pairs_only.loc["a", ["low", "high"]].tolist() == [1.5, 1.5]
    seeds = {"p": {"a": {0: 10.0, 1: 0.0}, "b": {0: 5.0, 1: 5.0}}}
    table = rank_table(scores, per_seed=seeds)
    assert table.loc["a", "mean_rank"] == 1.5 and table.loc["a", ["low", "high"]].tolist() == [1.0, 2.0]
    assert table.loc["a", "first"] == pytest.approx(0.75, abs=0.03)
    # the seeds are drawn once for both methods (paired): b = a + 1 on every seed keeps b first in every resample
    paired = {"p": {"a": {0: 10.0, 1: 0.0}, "b": {0: 11.0, 1: 1.0}}}
    table = rank_table(pd.DataFrame({"a": [5.0], "b": [6.0]}, index=["p"]), per_seed=paired)
    assert table.loc["b", ["low", "high", "first"]].tolist() == [1.0, 1.0, 1.0]


def test_table_statistics_and_bold_rule(store):  # noqa: F811
    table = next(t for t in comparison_tables(collect_runs(store), "best_top1") if t.key["epochs"] == 3)
    a, b = ("resnet_mini", "vit_mini"), ("mixer_mini", "vit_mini")
    kd, fitnet = table.cells[(a, "kd")], table.cells[(a, "fitnet")]
    # S = {0: 60, 1: 62}; kd = {0: 64, 1: 66, 2: 68}: paired over seeds 0, 1 -> 4, 4: no spread, no test, not bold
    assert (kd.vs_alone.mean, kd.vs_alone.n, kd.vs_alone.std) == (4.0, 2, 0.0) and not kd.beats_baseline
    assert kd.vs_alone.p is None and kd.holm_alone is None
    # fitnet = {0: 70, 1: 74}: 10, 12 -> 11 [-1.71, 23.71]: the row's best mean, not bold; the family's one test
    assert fitnet.vs_alone.low == pytest.approx(11 - T1, abs=1e-3) and not fitnet.beats_baseline
    assert fitnet.holm_alone == fitnet.vs_alone.p == pytest.approx(sp.ttest_rel([70, 74], [60, 62]).pvalue)
    assert fitnet.vs_kd.mean == pytest.approx(7.0) and fitnet.vs_kd.low == pytest.approx(7 - T1, abs=1e-3)
    one = table.cells[(b, "fitnet")]
    assert one.n == 1 and one.vs_alone.n == 1 and not one.beats_baseline and one.vs_kd.mean == pytest.approx(-2.0)
    md = table.to_markdown()
    assert "| 66.00 ± 2.00 [61.03, 70.97] (n=3) |" in md        # n shown where it is not the usual 2 seeds
    assert "| 72.00 ± 2.83 [46.59, 97.41] |" in md and "61.00 (1 seed)" in md
    assert "**" not in table.to_markdown(title=False)
    assert "+4.00 [+4.00, +4.00] (no test) |" in md and "+11.00 [-1.71, +23.71] (p=0.058) |" in md
    ranks = table.ranks()
    # pair A: fitnet 72 > kd 66 > S 61; pair B: kd 64 > S 61 = fitnet 61
    assert ranks["mean_rank"].to_dict() == {"kd": 1.5, "fitnet": 1.75, "none": 2.75}
    assert ranks.loc["kd", "wtl_vs_none"] == "0/2/0" and ranks.loc["fitnet", "wtl_vs_none"] == "0/2/0"
    assert ranks.loc["fitnet", "wtl_vs_kd"] == "0/2/0" and ranks.loc["none", "wtl_vs_none"] == "–"
    frame = table.to_frame()
    row = frame[(frame["teacher"] == "resnet_mini") & (frame["column"] == "fitnet")].iloc[0]
    assert row["vs_none"] == pytest.approx(11.0) and row["vs_none_n"] == 2 and not row["beats_none"]
    assert row["vs_none_p"] == row["vs_none_p_holm"] == pytest.approx(fitnet.vs_alone.p)
    assert row["ci_high"] == pytest.approx(72 + 2 * T1, abs=1e-2)
    tex = table.to_latex()
    assert "\\textbf" not in tex and "61.00$^1$" in tex


def _overhead(method, times, **ratios):
    times = list(times)
    return {"method": method, "step_time_ms": sorted(times)[len(times) // 2], "step_times_ms": times,
            "extra_params": 2_000_000 if method == "fitnet" else 0, **ratios}


def test_overhead_table_and_loaded_machine_warning():
    lines = []
    quiet = {"none": _overhead("none", [100, 101, 102], step_time_ms_vs_none=1.0),
             "fitnet": _overhead("fitnet", [150, 151, 152], step_time_ms_vs_none=1.5, step_time_ms_vs_kd=1.2)}
    assert print_overhead_table(quiet, lines.append) is False
    row = next(line for line in lines if line.startswith("fitnet"))
    assert "150.0" in row and "151.0" in row and "152.0" in row and "1.50x" in row and "2.000M" in row
    assert not any("warning" in line for line in lines)
    lines.clear()
    loaded = {**quiet, "kd": _overhead("kd", [100, 300, 540])}      # (540 - 100) / 300 = 147 %
    assert print_overhead_table(loaded, lines.append) is True
    assert "machine looks loaded" in lines[-1] and "kd (147%)" in lines[-1] and "fitnet" not in lines[-1]
    # an older record without per-step times: (median - fastest) / median, max shown as n/a
    old = {"none": {"method": "none", "step_time_ms": 100.0, "step_time_ms_min": 50.0, "extra_params": 0}}
    lines.clear()
    assert print_overhead_table(old, lines.append) is True and "n/a" in lines[1] and "50%" in lines[1]


def test_tables_say_whether_their_runs_share_batches(store):  # noqa: F811
    from hkdbench.benchmark.core.config import PIPELINE_VERSION

    runs = collect_runs(store)
    table = next(t for t in comparison_tables(runs) if t.key["epochs"] == 3)
    assert not table.batch_paired and "paired by seed only" in table.to_markdown()
    runs["pipeline"] = PIPELINE_VERSION  # every run drew its batches from the keyed stream
    table = next(t for t in comparison_tables(runs) if t.key["epochs"] == 3)
    assert table.batch_paired and "paired by seed and batch" in table.to_markdown()
    assert "paired by seed only" not in table.to_markdown() + table.to_latex()
    one = runs.index[(runs["epochs"] == 3) & (runs["method"] == "kd")][0]
    runs.loc[one, "pipeline"] = None  # one run from before it: its table cannot claim it
    assert not next(t for t in comparison_tables(runs) if t.key["epochs"] == 3).batch_paired


def _two_close_tests(root):
    """Two pairs whose distilled cells each differ from the student alone by 2, 4, 3 (raw p = 0.035 each)."""
    for seed, acc in enumerate([60.0, 62.0, 61.0]):
        write_run(root, "none", None, "vit_mini", seed, acc)
    for teacher in ("resnet_mini", "mixer_mini"):
        for seed, acc in enumerate([62.0, 66.0, 64.0]):
            write_run(root, "kd", teacher, "vit_mini", seed, acc)


def test_holm_unmarks_what_the_raw_intervals_would_bold(tmp_path):
    root = tmp_path / "runs"
    _two_close_tests(root)
    table = comparison_tables(collect_runs(root), "best_top1")[0]
    frame = table.to_frame().dropna(subset=["vs_none_p"])
    raw = sp.ttest_rel([62, 66, 64], [60, 62, 61]).pvalue                      # 0.0351: each alone would be a win
    assert frame["vs_none_p"].tolist() == pytest.approx([raw, raw])
    assert all(frame["vs_none_low"] > 0)                                       # the raw intervals exclude 0
    _, adjusted, _, _ = multipletests(frame["vs_none_p"], method="holm")
    assert frame["vs_none_p_holm"].tolist() == pytest.approx(list(adjusted))
    assert list(adjusted) == pytest.approx([2 * raw, 2 * raw])
    assert not frame["beats_none"].any() and "**" not in table.to_markdown(title=False)
    assert table.ranks().loc["kd", "wtl_vs_none"] == "0/2/0"
    assert "+3.00 [+0.52, +5.48] (p=0.070)" in table.to_markdown()


def _add_selection(run_dir, selected):
    """What a run trained with data.val_split adds: selected_top1 / selected_epoch, per-epoch val_top1 / val_loss."""
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "selected_top1": selected, "selected_epoch": 2}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({**r, "val_top1": 50.0 + r["epoch"], "val_loss": 1.0})
                                                   + "\n" for r in records))


def test_the_primary_column_is_the_validation_selected_epoch_else_the_last(tmp_path):
    root = tmp_path / "runs"
    dirs = [write_run(root, "none", None, "vit_mini", s, acc) for s, acc in enumerate([60.0, 62.0])]
    dirs += [write_run(root, "kd", "resnet_mini", "vit_mini", s, acc) for s, acc in enumerate([64.0, 67.0])]
    runs = collect_runs(root)
    assert primary_metric(runs) == "last_top1"                                  # no run has a validation split
    table = comparison_tables(runs)[0]
    assert table.metric == "last_top1" and table.cells[(("resnet_mini", "vit_mini"), "kd")].mean == 65.5
    assert "last-epoch top-1" in table.to_markdown() and "best test top-1" not in table.to_markdown()
    for d, selected in zip(dirs[:3], [59.0, 61.0, 63.0]):
        _add_selection(d, selected)
    assert primary_metric(collect_runs(root)) == "last_top1"                    # one run without: not every run has it
    _add_selection(dirs[3], 66.0)
    runs = collect_runs(root)
    assert primary_metric(runs) == "selected_top1" and runs["selected_epoch"].tolist() == [2] * 4
    table = comparison_tables(runs)[0]
    assert table.metric == "selected_top1" and table.cells[(("resnet_mini", "vit_mini"), "kd")].mean == 64.5
    assert "validation-selected epoch" in table.to_markdown()
    best = comparison_tables(runs, "best_top1")[0]
    assert "the papers' convention: the epoch chosen on the test set" in best.to_markdown()


def test_the_report_labels_the_test_selected_best_as_the_papers_convention(store, tmp_path):  # noqa: F811
    from hkdbench.analysis.report import make_report

    index = make_report(store, tmp_path / "out").read_text()
    compared, convention = index.split("## The papers' convention: the best test epoch")
    assert "last-epoch top-1 (%): mean" in compared and "best test top-1" not in compared.split("## Figures")[0]
    assert "optimistic by construction" in convention and "best test top-1 (%, the papers' convention" in convention
    assert "**" not in convention.split("## Figures")[0].replace("**fashion", "")
    assert (tmp_path / "out" / "tables" / "comparison_fashion-mnist_demo_3ep_e16c0926_papers_convention.md").exists() \
        or list((tmp_path / "out" / "tables").glob("*_papers_convention.md"))
    test_csv = next((tmp_path / "out" / "tables").glob("rank_test_*3ep*.csv"))
    assert list(pd.read_csv(test_csv).columns) == ["methods", "pairs", "chi2", "p_chi2", "f", "p_f", "q", "cd"]


def test_the_teacher_column_counts_teacher_runs_not_accuracy_values(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "none", None, "vit_mini", 0, 60.0)
    # two teacher runs that happen to reach the same 80.00: two teachers, not one
    for seed, run in enumerate(["teacher_resnet_mini_a", "teacher_resnet_mini_b"]):
        write_run(root, "kd", "resnet_mini", "vit_mini", seed, 64.0, teacher_run=run)
    # one teacher run shared by two seeds: one teacher
    for seed in (0, 1):
        write_run(root, "kd", "mixer_mini", "vit_mini", seed, 63.0, teacher_top1=85.0, teacher_run="teacher_mixer_x")
    table = comparison_tables(collect_runs(root))[0]
    two, one = table.teacher_acc[("resnet_mini", "vit_mini")][""], table.teacher_acc[("mixer_mini", "vit_mini")][""]
    assert (two.n, two.mean, two.std) == (2, 80.0, 0.0) and (one.n, one.mean) == (1, 85.0)


def test_signed_never_writes_minus_zero():
    assert [signed(v) for v in (-0.001, 0.004, -0.0, 0.006, -0.006, 1.234)] == [
        "0.00", "0.00", "0.00", "+0.01", "-0.01", "+1.23"]


def test_cd_diagram_bars_join_what_the_critical_difference_does_not_separate():
    from hkdbench.analysis.plots import _cliques

    # CD 1.0: a-b-c within 1 of each other (a to c: 0.9), d 1.5 below c, and d-e joined; no bar inside another
    assert _cliques({"a": 1.0, "b": 1.5, "c": 1.9, "d": 3.4, "e": 4.0}, 1.0) == [(1.0, 1.9), (3.4, 4.0)]
    assert _cliques({"a": 1.0, "b": 2.0, "c": 3.0}, 1.5) == [(1.0, 2.0), (2.0, 3.0)]   # overlapping groups
    assert _cliques({"a": 1.0, "b": 3.0}, 1.0) == []                                     # every order supported


def test_gain_heatmap_washes_out_cells_the_corrected_test_does_not_support():
    import matplotlib.pyplot as plt

    from hkdbench.analysis.plots import NOT_SIGNIFICANT_SHADE, _cell_colour

    cmap = plt.get_cmap("RdBu")
    strong, weak = _cell_colour(cmap, -25.8, 30.0, True), _cell_colour(cmap, -25.8, 30.0, False)
    assert list(strong) == pytest.approx(list(cmap((-25.8 + 30) / 60)))
    assert list(weak[:3]) == pytest.approx([NOT_SIGNIFICANT_SHADE * c + (1 - NOT_SIGNIFICANT_SHADE) * 0.9
                                            for c in strong[:3]])
    assert np.ptp(weak[:3]) < 0.3 * np.ptp(strong[:3])     # far less saturated: reads as grey, not as a finding


def test_the_table_states_only_the_orders_the_test_supports():
    from hkdbench.analysis.tables import rank_test_lines

    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 8, columns=["kd", "dist", "fitnet", "none"])
    ranks = rank_table(scores)
    text = " ".join(rank_test_lines(friedman(ranks_within_pairs(scores)), ranks))
    assert "kd above fitnet; kd above none (S); dist above none (S). No other order is supported." in text
    disagree = pd.DataFrame([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]], columns=["kd", "dist", "none"])
    text = " ".join(rank_test_lines(friedman(ranks_within_pairs(disagree)), rank_table(disagree)))
    assert "does not reject" in text and "no order between methods is supported" in text and "above" not in text
    assert "no order is tested" in rank_test_lines(None, rank_table(disagree))[0]
