"""The statistics of the comparison tables and figures, written out so that each can be checked by hand.

* :func:`mean_interval`: mean, sample std (ddof 1) and the two-sided t interval of the mean over seeds.
* :func:`paired_difference`: a method minus a baseline, seed by seed over the seeds both have, with its t interval.
  Two runs of one seed share their batches when both drew them from the keyed data stream (every run with a
  ``pipeline`` version).
* :func:`outcome` / :func:`win_tie_loss`: win when the paired interval lies above 0, loss when below, tie when it
  holds 0 or there is no interval (fewer than 2 paired seeds). The tables bold exactly the wins over the baseline.
* :func:`rank_table`: each method's rank within every teacher -> student pair (1 = best mean, ties share the mean of
  their ranks), averaged over pairs, with a percentile bootstrap interval over pairs (fixed seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values with its sample std and t interval (``None`` for both when n = 1)."""
    mean: float
    std: Optional[float]
    n: int
    low: Optional[float]
    high: Optional[float]

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                    -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`), for 0.5 <= p < 1."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def _clean(values: Iterable) -> list:
    return [float(v) for v in values if v is not None and not pd.isna(v)]


def mean_interval(values: Iterable, level: float = LEVEL) -> Optional[Estimate]:
    """Mean, sample std and t interval of ``values`` (NaN dropped); None when there is none."""
    vals = _clean(values)
    n = len(vals)
    if n == 0:
        return None
    mean = sum(vals) / n
    if n == 1:
        return Estimate(mean, None, 1, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = LEVEL) -> Optional[Estimate]:
    """``method[seed] - baseline[seed]`` over the seeds both have, summarised by :func:`mean_interval`."""
    seeds = sorted(s for s in method if s in baseline and not pd.isna(method[s]) and not pd.isna(baseline[s]))
    return mean_interval([method[s] - baseline[s] for s in seeds], level)


def outcome(diff: Optional[Estimate]) -> str:
    """'win', 'loss' or 'tie' of a paired difference (see the module docstring for the rule)."""
    if diff is None or not diff.excludes_zero:
        return "tie"
    return "win" if diff.low > 0 else "loss"


def win_tie_loss(diffs: Iterable[Optional[Estimate]]) -> Tuple[int, int, int]:
    outcomes = [outcome(d) for d in diffs]
    return outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss")


def ranks_within_pairs(scores: pd.DataFrame) -> pd.DataFrame:
    """Rank of every method (columns) within every pair (rows): 1 = highest score, ties share their mean rank.
    Only pairs where every method has a score are ranked (a rank over fewer methods is not comparable)."""
    complete = scores.dropna(axis=0, how="any")
    return complete.rank(axis=1, ascending=False, method="average")


def rank_table(scores: pd.DataFrame, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
               level: float = LEVEL) -> pd.DataFrame:
    """Average rank per method over the complete pairs of ``scores`` (pairs x methods), with the percentile
    bootstrap interval of that average: pairs resampled with replacement ``resamples`` times (numpy's default
    generator seeded with ``seed``). Columns: mean_rank, low, high, pairs."""
    ranks = ranks_within_pairs(scores)
    if ranks.empty:
        return pd.DataFrame(columns=["mean_rank", "low", "high", "pairs"])
    values = ranks.to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    boot = values[picks].mean(axis=1)                    # (resamples, methods)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    return pd.DataFrame({"mean_rank": values.mean(axis=0), "low": low, "high": high, "pairs": len(values)},
                        index=ranks.columns)


def by_seed(frame: pd.DataFrame, metric: str) -> Dict[int, float]:
    """``{seed: metric}`` of the runs of one cell (one run per seed; a repeated seed is averaged)."""
    values = frame.groupby("seed")[metric].mean()
    return {int(s): float(v) for s, v in values.items() if not pd.isna(v)}
