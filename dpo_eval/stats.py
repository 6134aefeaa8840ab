"""Statistical building blocks of the analysis: pure numpy/scipy functions with their formulas."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH q-values: q_(i) = min_{k >= i} p_(k) * m / k over the m non-NaN p-values; NaN stays NaN."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    monotone = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(monotone, 1.0)
    q[ok] = out
    return q


def rank_biserial(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation r = (W+ - W-) / (W+ + W-).

    W+ and W- are the sums of the ranks of |d| (average ranks for ties) over the positive and the
    negative differences; zero differences are dropped, as the Wilcoxon test drops them. Range [-1, 1].
    """
    d = np.asarray(d, dtype=float)
    d = d[d != 0]
    if d.size == 0:
        return float("nan")
    ranks = sps.rankdata(np.abs(d))
    w_plus, w_minus = ranks[d > 0].sum(), ranks[d < 0].sum()
    return float((w_plus - w_minus) / (w_plus + w_minus))


def wilcoxon(d: np.ndarray) -> tuple[float, float, str]:
    """Two-sided Wilcoxon signed-rank test of d (scipy.stats.wilcoxon): (statistic, p, reason if NaN)."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return np.nan, np.nan, "no records"
    if np.all(d == 0):
        return np.nan, np.nan, "all deltas zero"
    result = sps.wilcoxon(d, alternative="two-sided")
    return float(result.statistic), float(result.pvalue), ""


def resample_counts(n: int, n_resamples: int, rng: np.random.Generator, chunk: int = 250):
    """Yield bootstrap count matrices (k x n): row b counts how often each record is drawn in resample b."""
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        draws = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=k * n).reshape(k, n).astype(float)


def bootstrap_means(values: np.ndarray, valid: np.ndarray, n_resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Bootstrap distribution (n_resamples x F) of the column means of `values` (n x F).

    Records are resampled with replacement; each column's mean uses the drawn records valid for it
    (`valid`, n x F). One matrix product per chunk: no Python loop over resamples.
    """
    n = values.shape[0]
    if n == 0:
        return np.full((n_resamples, values.shape[1]), np.nan)
    x = np.where(valid, values, 0.0)
    w = valid.astype(float)
    out = []
    for counts in resample_counts(n, n_resamples, rng):
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((counts @ x) / (counts @ w))
    return np.vstack(out)


def sign_flip_means(values: np.ndarray, valid: np.ndarray, n_perm: int,
                    rng: np.random.Generator, chunk: int = 250) -> np.ndarray:
    """Column means (n_perm x F) after flipping the sign of each record's whole row at random.

    Flipping a record's deltas for all features at once keeps the correlation between features,
    which a per-feature test would ignore.
    """
    n = values.shape[0]
    x = np.where(valid, values, 0.0)
    counts = valid.sum(axis=0).astype(float)
    out = []
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(k, n))
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append((signs @ x) / counts)
    return np.vstack(out) if out else np.empty((0, values.shape[1]))


def intercept_at_zero(y: np.ndarray, x: np.ndarray) -> tuple[float, float, str]:
    """OLS y = a + b x: the intercept a (y's shift where x = 0) and its two-sided t-test p-value."""
    y, x = np.asarray(y, float), np.asarray(x, float)
    n = y.size
    if n < 3:
        return np.nan, np.nan, "fewer than 3 records"
    if np.all(x == x[0]):
        return np.nan, np.nan, "length delta constant"
    design = np.column_stack([np.ones(n), x])
    coef, _, _, _ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    sigma2 = resid @ resid / (n - 2)
    cov = sigma2 * np.linalg.inv(design.T @ design)
    se = float(np.sqrt(cov[0, 0]))
    if se == 0:
        return float(coef[0]), np.nan, "exact fit"
    t = coef[0] / se
    return float(coef[0]), float(2 * sps.t.sf(abs(t), n - 2)), ""
