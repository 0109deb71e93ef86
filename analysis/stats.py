"""The statistics of the comparison tables and figures, written out so that each can be checked by hand.

* :func:`mean_interval`: mean, sample std (ddof 1) and the two-sided t interval of the mean over seeds.
* :func:`paired_difference`: a method minus a baseline, seed by seed over the seeds both have, with its t interval.
  Two runs of one seed share their batches when both drew them from the keyed data stream (every run with a
  ``pipeline`` version).
  Its two-sided p-value is the one-sample t test of the differences against 0; a difference with no spread (every
  seed's difference the same, as two seeds in 0.05-point steps often give) or fewer than 2 seeds has no test
  (``p`` None): the t statistic is infinite or undefined, so it is never a win.
* :func:`holm`: Holm's (1979) step-down adjustment of a family of p-values (controls the family-wise error rate under
  any dependence between the tests; they share the student alone's runs, which rules out the plain Sidak form).
* :func:`outcome` / :func:`win_tie_loss`: win when the Holm-adjusted p-value of the difference is below ``ALPHA`` and
  its mean above 0, loss when below 0, tie otherwise (no test, or not significant after the correction).
* :func:`rank_table`: each method's rank within every teacher -> student pair (1 = best mean, ties share the mean of
  their ranks), averaged over pairs, with a percentile bootstrap interval that resamples the pairs and, within each
  drawn pair, its seeds (fixed seed).
* :func:`friedman` / :func:`nemenyi_cd`: Friedman's test of "every method ranks alike" across pairs (chi-square with
  the ties correction, and Iman and Davenport's F), and the critical difference of average ranks of the Nemenyi
  post-hoc test (Demsar 2006): two methods whose average ranks differ by more than it differ significantly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

LEVEL = 0.95
ALPHA = 1 - LEVEL
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` values with its sample std and t interval (``None`` for both when n = 1); ``p``: the
    two-sided p-value of the t test of mean 0 (differences only; None where there is no test)."""
    mean: float
    std: Optional[float]
    n: int
    low: Optional[float]
    high: Optional[float]
    p: Optional[float] = None

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


# a spread below this (in the metric's units) is none: differences of values stored to 0.01 that agree on every seed
# leave a float residue of ~1e-14, not a spread
ZERO_SPREAD = 1e-9


def t_test_p(estimate: Optional[Estimate]) -> Optional[float]:
    """Two-sided p-value of the one-sample t test of mean 0; None with fewer than 2 values or no spread."""
    if estimate is None or estimate.n < 2 or estimate.std is None or estimate.std <= ZERO_SPREAD:
        return None
    t = abs(estimate.mean) / (estimate.std / math.sqrt(estimate.n))
    return min(1.0, 2.0 * (1.0 - t_cdf(t, estimate.n - 1)))


def paired_difference(method: Mapping[int, float], baseline: Mapping[int, float],
                      level: float = LEVEL) -> Optional[Estimate]:
    """``method[seed] - baseline[seed]`` over the seeds both have, summarised by :func:`mean_interval`, with the
    p-value of its t test (:func:`t_test_p`)."""
    seeds = sorted(s for s in method if s in baseline and not pd.isna(method[s]) and not pd.isna(baseline[s]))
    est = mean_interval([method[s] - baseline[s] for s in seeds], level)
    return replace(est, p=t_test_p(est)) if est is not None else None


def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values, in the order given; a None (no test) stays None and is not counted in the
    family. The k-th smallest of m p-values is multiplied by m - k + 1, and the adjusted values are made monotone
    (an adjusted p-value is never below that of a smaller raw one); reject where the adjusted p-value < alpha."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: List[Optional[float]] = [None] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        out[i] = running
    return out


def significant(diff: Optional[Estimate], adjusted_p: Optional[float], alpha: float = ALPHA) -> bool:
    """The corrected decision: the difference was tested and its adjusted p-value is below ``alpha``."""
    return diff is not None and adjusted_p is not None and adjusted_p < alpha


def outcome(diff: Optional[Estimate], adjusted_p: Optional[float]) -> str:
    """'win', 'loss' or 'tie' of a paired difference under the corrected decision (module docstring)."""
    if not significant(diff, adjusted_p):
        return "tie"
    return "win" if diff.mean > 0 else "loss"


def win_tie_loss(tests: Iterable[Tuple[Optional[Estimate], Optional[float]]]) -> Tuple[int, int, int]:
    """Counts of :func:`outcome` over (difference, adjusted p-value) pairs."""
    outcomes = [outcome(d, p) for d, p in tests]
    return outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss")


def ranks_within_pairs(scores: pd.DataFrame) -> pd.DataFrame:
    """Rank of every method (columns) within every pair (rows): 1 = highest score, ties share their mean rank.
    Only pairs where every method has a score are ranked (a rank over fewer methods is not comparable)."""
    complete = scores.dropna(axis=0, how="any")
    return complete.rank(axis=1, ascending=False, method="average")


# per pair (the index of the scores), per method, {seed: value}: what the rank bootstrap resamples within a pair
SeedValues = Mapping[object, Mapping[str, Mapping[int, float]]]


def _rank_rows(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, 1 = highest, ties share the mean of their ranks (as ``ranks_within_pairs``)."""
    above = (values[..., None, :] > values[..., :, None]).sum(axis=-1)
    equal = (values[..., None, :] == values[..., :, None]).sum(axis=-1)
    return above + (equal + 1) / 2.0


def _seed_matrix(cells: Mapping[str, Mapping[int, float]], methods: Sequence[str]) -> np.ndarray:
    """(seeds, methods) values of one pair, NaN where a method lacks a seed."""
    seeds = sorted({s for m in methods for s in cells.get(m, {})})
    return np.array([[cells.get(m, {}).get(s, np.nan) for m in methods] for s in seeds], dtype=float)


def _resampled_means(matrix: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(resamples, methods): per resample, every method's mean over one draw of the pair's seeds with replacement.
    The seeds are drawn once for every method (the methods of a seed share its batches: the pairing is kept); a
    method that has none of the drawn seeds keeps its mean over all of its own."""
    picks = rng.integers(0, len(matrix), size=(resamples, len(matrix)))
    drawn = matrix[picks]                                        # (resamples, seeds, methods)
    have = ~np.isnan(drawn)
    counts = have.sum(axis=1)
    sums = np.where(have, drawn, 0.0).sum(axis=1)
    own = np.nanmean(matrix, axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), own)


def _bootstrap_ranks(ranks: pd.DataFrame, per_seed: Optional[SeedValues], rng: np.random.Generator,
                     resamples: int) -> np.ndarray:
    """(resamples, methods) average ranks: pairs drawn with replacement and, with ``per_seed``, every drawn pair's
    seeds drawn anew (a pair drawn twice gets two seed draws)."""
    values = ranks.to_numpy(dtype=float)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    if per_seed is None:
        return values[picks].mean(axis=1)
    matrices = [_seed_matrix(per_seed[pair], list(ranks.columns)) for pair in ranks.index]
    total = np.zeros((resamples, values.shape[1]))
    rows = np.arange(resamples)
    for slot in range(len(values)):
        drawn = np.stack([_rank_rows(_resampled_means(m, rng, resamples)) for m in matrices])  # (pairs, R, methods)
        total += drawn[picks[:, slot], rows]
    return total / len(values)


def rank_table(scores: pd.DataFrame, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
               level: float = LEVEL, per_seed: Optional[SeedValues] = None) -> pd.DataFrame:
    """Average rank per method over the complete pairs of ``scores`` (pairs x methods), with the percentile
    bootstrap interval of that average: pairs resampled with replacement ``resamples`` times (numpy's default
    generator seeded with ``seed``) and, given ``per_seed`` (the values behind each mean), the seeds within every
    drawn pair too, so that the interval holds the seed noise of the means ranked. Columns: mean_rank, low, high,
    first (the share of resamples in which the method ranks best or ties for it), pairs."""
    ranks = ranks_within_pairs(scores)
    if ranks.empty:
        return pd.DataFrame(columns=["mean_rank", "low", "high", "first", "pairs"])
    boot = _bootstrap_ranks(ranks, per_seed, np.random.default_rng(seed), resamples)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail], axis=0)
    first = (boot <= boot.min(axis=1, keepdims=True)).mean(axis=0)
    return pd.DataFrame({"mean_rank": ranks.to_numpy(dtype=float).mean(axis=0), "low": low, "high": high,
                         "first": first, "pairs": len(ranks)}, index=ranks.columns)


# -- Friedman's test and the Nemenyi critical difference ---------------------------------------------------------

def _gamma_series(a: float, x: float) -> float:
    """Regularised lower incomplete gamma P(a, x) by its power series (x < a + 1)."""
    term = total = 1.0 / a
    for n in range(1, 1000):
        term *= x / (a + n)
        total += term
        if abs(term) < abs(total) * 1e-16:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_fraction(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) by its continued fraction (modified Lentz, x >= a + 1)."""
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - math.lgamma(a)) * h


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for the chi-square distribution with ``df`` degrees of freedom."""
    if x <= 0:
        return 1.0
    a, half = df / 2.0, x / 2.0
    return 1.0 - _gamma_series(a, half) if half < a + 1 else _gamma_fraction(a, half)


def f_sf(x: float, d1: int, d2: int) -> float:
    """P(X > x) for the F distribution with (d1, d2) degrees of freedom."""
    if x <= 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    return 1.0 - _betainc(d1 / 2.0, d2 / 2.0, d1 * x / (d1 * x + d2))


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0)))


def range_cdf(q: float, k: int) -> float:
    """P(range of k independent standard normals <= q): k * integral of phi(z) (Phi(z + q) - Phi(z))^(k-1) dz
    (the studentized range at infinite degrees of freedom), by the trapezoid rule on [-9, 9]."""
    z = np.linspace(-9.0, 9.0, 3601)
    density = np.exp(-z * z / 2.0) / math.sqrt(2.0 * math.pi)
    inner = np.clip(_normal_cdf(z + q) - _normal_cdf(z), 0.0, 1.0) ** (k - 1)
    y = k * density * inner
    return float(((y[1:] + y[:-1]) / 2.0 * np.diff(z)).sum())


def nemenyi_q(k: int, alpha: float = ALPHA) -> float:
    """Nemenyi's q_alpha for k methods: the 1 - alpha quantile of the studentized range at infinite df over sqrt 2
    (Demsar 2006, Table 5a: 1.960, 2.343, 2.569 ... for k = 2, 3, 4), by bisection on :func:`range_cdf`."""
    if k < 2:
        raise ValueError(f"nemenyi_q needs at least 2 methods, got {k}")
    low, high = 0.0, 10.0
    for _ in range(60):
        mid = (low + high) / 2.0
        low, high = (mid, high) if range_cdf(mid, k) < 1.0 - alpha else (low, mid)
    return (low + high) / 2.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class RankTest:
    """Friedman's test over ``pairs`` blocks and ``methods`` treatments, and the Nemenyi critical difference."""
    methods: int
    pairs: int
    chi2: float          # Friedman's statistic, corrected for ties
    p_chi2: float
    f: float             # Iman and Davenport's F, from chi2
    p_f: float
    q: float             # Nemenyi's q_alpha for ``methods``
    cd: float            # critical difference of average ranks

    @property
    def rejects(self) -> bool:
        """Iman and Davenport's F (Demsar's recommendation: the chi-square is conservative) rejects 'every method
        ranks alike' at ALPHA: only then is a post-hoc order read."""
        return self.p_f < ALPHA


def friedman(ranks: pd.DataFrame, alpha: float = ALPHA) -> Optional[RankTest]:
    """Friedman's test of :func:`ranks_within_pairs`' ranks (pairs x methods); None with fewer than 2 pairs or
    methods. Ties are corrected for as scipy's ``friedmanchisquare`` does: the statistic over
    1 - sum(t^3 - t) / (n k (k^2 - 1)), t the size of each group of tied values in a pair."""
    n, k = ranks.shape
    if n < 2 or k < 2:
        return None
    sums = ranks.sum(axis=0).to_numpy(dtype=float)
    chi2 = 12.0 / (n * k * (k + 1)) * float((sums ** 2).sum()) - 3.0 * n * (k + 1)
    ties = sum(float(t ** 3 - t) for _, row in ranks.iterrows() for t in row.value_counts().to_numpy())
    correction = 1.0 - ties / (n * k * (k * k - 1))
    chi2 = chi2 / correction if correction > 0 else 0.0
    denominator = n * (k - 1) - chi2
    f = (n - 1) * chi2 / denominator if denominator > 1e-12 else math.inf
    q = nemenyi_q(k, alpha)
    return RankTest(k, n, chi2, chi2_sf(chi2, k - 1), f, f_sf(f, k - 1, (k - 1) * (n - 1)), q,
                    q * math.sqrt(k * (k + 1) / (6.0 * n)))


def supported_orders(mean_ranks: Mapping[str, float], test: Optional[RankTest]) -> List[Tuple[str, str]]:
    """(better, worse) for every two methods whose average ranks differ by more than the critical difference,
    where Friedman's test rejects (else none: no order is supported)."""
    if test is None or not test.rejects:
        return []
    items = sorted(mean_ranks.items(), key=lambda kv: kv[1])
    return [(a, b) for i, (a, ra) in enumerate(items) for b, rb in items[i + 1:] if rb - ra > test.cd]


def by_seed(frame: pd.DataFrame, metric: str) -> Dict[int, float]:
    """``{seed: metric}`` of the runs of one cell (one run per seed; a repeated seed is averaged)."""
    values = frame.groupby("seed")[metric].mean()
    return {int(s): float(v) for s, v in values.items() if not pd.isna(v)}
