"""Pearson's chi-square against an exact distribution, with its threshold and its power.

For n draws from a distribution at total-variation distance d from the expected one, the
statistic is asymptotically non-central chi-square with non-centrality at least 4 n d^2
(Cauchy-Schwarz: sum |e_i| = 2d gives sum e_i^2 / p_i >= 4 d^2). Its power against every
alternative at distance d is at least P(ncx2(df, 4 n d^2) > threshold), computed here by
simulation (numpy only), as is the threshold (the chi-square quantile).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MIN_EXPECTED = 5.0   # cells expected less often are pooled into one


def _cells(expected: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    small = expected < MIN_EXPECTED
    e = np.append(expected[~small], expected[small].sum())
    o = np.append(observed[~small], observed[small].sum())
    keep = e > 0
    return e[keep], o[keep]


def chi_square(observed: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """(statistic, degrees of freedom) of counts `observed` against `probs`; infinite when a
    count falls where the probability is 0."""
    observed, probs = np.asarray(observed, float).ravel(), np.asarray(probs, float).ravel()
    if observed[probs <= 0].sum() > 0:
        return float("inf"), 1
    e, o = _cells(probs * observed.sum(), observed)
    return float(((o - e) ** 2 / e).sum()), max(len(e) - 1, 1)


@lru_cache
def threshold(df: int, alpha: float, sims: int = 200_000) -> float:
    """The (1 - alpha) quantile of chi-square(df), by simulation."""
    rng = np.random.default_rng(0)
    return float(np.quantile(rng.chisquare(df, sims), 1 - alpha))


def power(df: int, n: int, tv: float, alpha: float, sims: int = 200_000) -> float:
    """Lower bound on the probability that the test at level alpha rejects n draws from a
    distribution at total-variation distance tv."""
    rng = np.random.default_rng(1)
    lam = 4 * n * tv ** 2
    stat = (rng.standard_normal(sims) + np.sqrt(lam)) ** 2
    if df > 1:
        stat = stat + rng.chisquare(df - 1, sims)
    return float((stat > threshold(df, alpha)).mean())


def passes(observed, probs, alpha: float) -> bool:
    stat, df = chi_square(observed, probs)
    return stat <= threshold(df, alpha)
