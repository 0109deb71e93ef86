"""The statistics of the tables and figures against values computed by hand (t table: df 1 12.7062, df 2 4.3027)."""
import math

import pandas as pd
import pytest

from hkdbench.analysis.collect import collect_runs
from hkdbench.analysis.overhead_table import print_overhead_table
from hkdbench.analysis.stats import (Estimate, mean_interval, outcome, paired_difference, rank_table,
                                     ranks_within_pairs, t_quantile, win_tie_loss)
from hkdbench.analysis.tables import comparison_tables

from test_analysis import store  # noqa: F401  (the synthetic run store fixture)

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
    assert d.low == pytest.approx(11 - T1, abs=1e-3) and not d.excludes_zero and outcome(d) == "tie"
    # the same gap on every seed: a zero-width interval above 0 is a win
    assert outcome(paired_difference({0: 64.0, 1: 66.0}, {0: 60.0, 1: 62.0})) == "win"
    loss = paired_difference({0: 50.0, 1: 51.0, 2: 52.0}, {0: 60.0, 1: 60.0, 2: 60.0})
    assert loss.high == pytest.approx(-9 + T2 * 1 / math.sqrt(3), abs=1e-3) and outcome(loss) == "loss"
    assert outcome(paired_difference({0: 70.0}, {0: 60.0})) == "tie"  # one paired seed: no interval
    assert paired_difference({0: 1.0}, {1: 1.0}) is None
    assert win_tie_loss([loss, d, None, paired_difference({0: 64.0, 1: 66.0}, {0: 60.0, 1: 62.0})]) == (1, 2, 1)


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


def test_table_statistics_and_bold_rule(store):  # noqa: F811
    table = next(t for t in comparison_tables(collect_runs(store)) if t.key["epochs"] == 3)
    a, b = ("resnet_mini", "vit_mini"), ("mixer_mini", "vit_mini")
    kd, fitnet = table.cells[(a, "kd")], table.cells[(a, "fitnet")]
    # S = {0: 60, 1: 62}; kd = {0: 64, 1: 66, 2: 68}: paired over seeds 0, 1 -> 4, 4: a win, bold
    assert (kd.vs_alone.mean, kd.vs_alone.n, kd.vs_alone.std) == (4.0, 2, 0.0) and kd.beats_baseline
    # fitnet = {0: 70, 1: 74}: 10, 12 -> 11 [-1.71, 23.71]: the row's best mean, not bold (its interval holds 0)
    assert fitnet.vs_alone.low == pytest.approx(11 - T1, abs=1e-3) and not fitnet.beats_baseline
    assert fitnet.vs_kd.mean == pytest.approx(7.0) and fitnet.vs_kd.low == pytest.approx(7 - T1, abs=1e-3)
    one = table.cells[(b, "fitnet")]
    assert one.n == 1 and one.vs_alone.n == 1 and not one.beats_baseline and one.vs_kd.mean == pytest.approx(-2.0)
    md = table.to_markdown()
    assert "**66.00 ± 2.00 [61.03, 70.97] (n=3)**" in md        # n shown where it is not the usual 2 seeds
    assert "| 72.00 ± 2.83 [46.59, 97.41] |" in md and "61.00 (1 seed)" in md
    assert "**+4.00 [+4.00, +4.00]***" in md and "+11.00 [-1.71, +23.71] |" in md
    ranks = table.ranks()
    # pair A: fitnet 72 > kd 66 > S 61; pair B: kd 64 > S 61 = fitnet 61
    assert ranks["mean_rank"].to_dict() == {"kd": 1.5, "fitnet": 1.75, "none": 2.75}
    assert ranks.loc["kd", "wtl_vs_none"] == "2/0/0" and ranks.loc["fitnet", "wtl_vs_none"] == "0/2/0"
    assert ranks.loc["fitnet", "wtl_vs_kd"] == "0/2/0" and ranks.loc["none", "wtl_vs_none"] == "–"
    frame = table.to_frame()
    row = frame[(frame["teacher"] == "resnet_mini") & (frame["column"] == "fitnet")].iloc[0]
    assert row["vs_none"] == pytest.approx(11.0) and row["vs_none_n"] == 2 and not row["beats_none"]
    assert row["ci_high"] == pytest.approx(72 + 2 * T1, abs=1e-2)
    tex = table.to_latex()
    assert "\\textbf{66.00 $\\pm$ 2.00}" in tex and "\\textbf{72.00" not in tex and "61.00$^1$" in tex


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
