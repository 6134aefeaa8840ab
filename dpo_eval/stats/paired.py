"""Statistical building blocks of the analysis: pure numpy/scipy functions with their formulas."""

from __future__ import annotations

import math
import zlib

import numpy as np
from scipy import stats as sps

ZERO_RTOL = 1e-12  # a mean delta is 0 when |sum d| <= ZERO_RTOL * sum |d| (float round-off, not a shift)
FIT_RTOL = 1e-9  # a regression is exact when rms(residual) <= FIT_RTOL * rms(y)
PURPOSES = ("bootstrap", "permutations")


def rng_for(seed: int, split: str, purpose: str) -> np.random.Generator:
    """The random stream of one split and one purpose (`bootstrap` or `permutations`).

    numpy SeedSequence([seed mod 2^64, crc32(split), index of purpose]): streams are independent of each
    other, so changing the number of permutations (or adding a split) leaves every bootstrap CI unchanged.
    """
    key = [int(seed) % 2**64, zlib.crc32(split.encode()), PURPOSES.index(purpose)]
    return np.random.default_rng(np.random.SeedSequence(key))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH q-values (scipy.stats.false_discovery_control, method "bh"): q_(i) = min_{k >= i} p_(k) m / k
    over the m non-NaN p-values of the family; NaN p stays NaN and does not count in m."""
    p = np.asarray(p, dtype=float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = sps.false_discovery_control(p[ok], method="bh")
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


def wilson(k: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of k successes in n; NaN without trials. Never zero-width at k = 0 or n, where a
    percentile bootstrap over the trials is.

    With p = k / n and z the normal quantile at (1 + level) / 2: centre (p + z^2 / 2n) / (1 + z^2 / n),
    half-width z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2). k may be fractional (a tie counted as
    half a success, as win rates and judge agreement count it); for whole k this is scipy.stats.binomtest's
    proportion_ci(method="wilson").
    """
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k = {k} successes outside 0..n = {n}")
    z = float(sps.norm.ppf((1 + level) / 2))
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def wilcoxon(d: np.ndarray, alpha: float = 0.05) -> tuple[float, float, str]:
    """Two-sided Wilcoxon signed-rank test of d (scipy.stats.wilcoxon): (statistic, p, reason).

    p is NaN, with a reason, where there is no test (no records, all deltas zero). With k nonzero
    deltas the smallest possible exact two-sided p is 2 / 2^k; where that is above alpha (k <= 5 at
    alpha = 0.05) the test cannot reject, and the reason says so.
    """
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        return np.nan, np.nan, "no records"
    if np.all(d == 0):
        return np.nan, np.nan, "all deltas zero"
    k = int(np.count_nonzero(d))
    result = sps.wilcoxon(d, alternative="two-sided", method="asymptotic")  # the statistic, cheaply
    p = _small_tied_p(d) if d.size <= EXACT_MAX and (k < d.size or np.unique(np.abs(d)).size < d.size) \
        else float(sps.wilcoxon(d, alternative="two-sided").pvalue)
    floor = math.ldexp(1.0, 1 - k)  # 2 / 2^k, 0.0 (not an overflow) for large k
    why = (f"only {k} nonzero deltas: the smallest possible two-sided p is {floor:.3g} > alpha {alpha:g}"
           if floor > alpha else "")
    return float(result.statistic), p, why


EXACT_MAX = 13  # scipy's method="auto" enumerates every sign flip up to here when there are ties or zeros


def _small_tied_p(d: np.ndarray) -> float:
    """scipy.stats.wilcoxon's own p for n <= 13 with ties or zeros (an exact permutation test over all 2^n
    sign flips), with its statistic evaluated for all flips at once: scipy calls it once per flip, about
    0.7 s for n = 12, which made a small valid split cost minutes over 69 features. Equal to scipy's p
    (tests/test_stats.py checks it on random tied samples); the statistic is scipy's private
    _wilcoxon_statistic, so a scipy that moves it fails that test rather than changing a p-value."""
    from scipy._lib._array_api import array_namespace
    from scipy.stats._wilcoxon import _wilcoxon_statistic

    xp = array_namespace(d)

    def r_plus(x, axis):
        return _wilcoxon_statistic(np.moveaxis(x, axis, -1), sps.PermutationMethod(), "wilcox", xp=xp)[0]

    return float(sps.permutation_test((d,), r_plus, vectorized=True, permutation_type="samples", n_resamples=9999,
                                      alternative="two-sided", axis=-1).pvalue)


def wilcoxon_power(n: int, shift: float = 0.5, alpha: float = 0.05) -> float:
    """Power of the two-sided Wilcoxon signed-rank test at alpha to find a mean shift of `shift` * sigma
    with n pairs, the deltas normal with standard deviation sigma (the scale S).

    Normal-data approximation through the asymptotic relative efficiency of the Wilcoxon test to the
    t-test on normal data, 3/pi: the paired t-test's power with n_e = n * 3/pi pairs, from the noncentral
    t: P(|T| > t_{1-alpha/2, n_e-1}) with T ~ nct(df = n_e - 1, nc = shift * sqrt(n_e)). Where the exact
    test cannot reach alpha at all (2 / 2^n > alpha) the power is 0; NaN for n_e <= 1 otherwise.
    """
    if n < 1 or math.ldexp(1.0, 1 - n) > alpha:
        return 0.0 if n >= 1 else float("nan")
    n_e = n * 3 / math.pi
    if n_e <= 1:
        return float("nan")
    df, nc = n_e - 1, shift * math.sqrt(n_e)
    crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc))


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


def mean_signs(sums: np.ndarray, abs_sums: np.ndarray) -> np.ndarray:
    """sign(mean d) from sum d and sum |d| over the valid records: 0 where |sum d| <= ZERO_RTOL * sum |d|
    (so round-off never turns an exact 0 into a sign); NaN where there are no valid records."""
    with np.errstate(invalid="ignore"):
        return np.where(np.abs(sums) <= ZERO_RTOL * abs_sums, 0.0, np.sign(sums))


def sign_flip_sums(values: np.ndarray, valid: np.ndarray, n_perm: int,
                   rng: np.random.Generator, chunk: int = 250) -> np.ndarray:
    """Column sums (n_perm x F) after flipping the sign of each record's whole row at random.

    Flipping a record's deltas for all features at once keeps the correlation between features,
    which a per-feature test would ignore.
    """
    n = values.shape[0]
    x = np.where(valid, values, 0.0)
    out = []
    for start in range(0, n_perm, chunk):
        k = min(chunk, n_perm - start)
        out.append(rng.choice(np.array([-1.0, 1.0]), size=(k, n)) @ x)
    return np.vstack(out) if out else np.empty((0, values.shape[1]))


def sign_agreement_test(direction: np.ndarray, tb: np.ndarray, valid: np.ndarray, n_perm: int,
                        rng: np.random.Generator) -> tuple[float, float, int]:
    """Does tuned-base agree in sign with chosen-rejected more often than chance? (share, p, features).

    direction (F): sign(mean d_cr), 0 or NaN where a feature has no direction (left out). For the
    tuned-base deltas tb (n x F, `valid` marks the usable records) the statistic is
        T = #{j: direction_j * sign(mean tb_j) = +1} / #{j: sign(mean tb_j) != 0}
    over the features with a direction: a feature whose mean tb is 0 is left out of both counts, in the
    observed data and in every flip alike. The null flips each record's whole row of tb at random
    (n_perm flips); one-sided p = (1 + #{T_flip >= T_obs}) / (1 + n_perm). A flip with no nonzero mean
    has no T and never counts as >= T_obs; p is NaN where the observed share is undefined or n_perm = 0.
    """
    x = np.where(valid, tb, 0.0)
    abs_sums = np.abs(x).sum(axis=0)
    has = np.isfinite(direction) & (direction != 0) & valid.any(axis=0)

    def share(sums):
        signs = mean_signs(sums[..., has], abs_sums[has])
        with np.errstate(invalid="ignore", divide="ignore"):
            return (direction[has] * signs == 1).sum(axis=-1) / (signs != 0).sum(axis=-1)

    observed_signs = mean_signs(x.sum(axis=0)[has], abs_sums[has])
    observed = float(share(x.sum(axis=0)))
    n_features = int((observed_signs != 0).sum())
    if n_perm == 0 or not np.isfinite(observed):
        return observed, float("nan"), n_features
    null = share(sign_flip_sums(tb, valid, n_perm, rng))
    return observed, float((1 + np.sum(null >= observed)) / (1 + n_perm)), n_features


def intercept_at_zero(y: np.ndarray, x: np.ndarray) -> tuple[float, float, str]:
    """OLS y = a + b x (scipy.stats.linregress): the intercept a (y's shift where x = 0) and the
    two-sided t-test p of a, t = a / se(a) with n - 2 degrees of freedom.

    An exact fit (rms residual <= FIT_RTOL * rms y, so exact up to round-off) has no test: p is NaN
    with a reason, never a p from a standard error made of round-off.
    """
    y, x = np.asarray(y, float), np.asarray(x, float)
    n = y.size
    if n < 3:
        return np.nan, np.nan, "fewer than 3 records for the length fit"
    if np.all(x == x[0]):
        return np.nan, np.nan, "length delta constant"
    fit = sps.linregress(x, y)
    resid = y - (fit.intercept + fit.slope * x)
    if np.sqrt(np.mean(resid**2)) <= FIT_RTOL * np.sqrt(np.mean(y**2)) or not fit.intercept_stderr > 0:
        return float(fit.intercept), np.nan, "exact linear fit on the length delta: no length-adjusted p"
    t = fit.intercept / fit.intercept_stderr
    return float(fit.intercept), float(2 * sps.t.sf(abs(t), n - 2)), ""
