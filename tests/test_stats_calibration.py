"""The statistics of issue 11 item 3, each checked against scipy, plain numpy or a seeded simulation on
synthetic data whose answer is known in advance (never against numbers the code itself produced)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.stats.analysis import AnalysisSpec, run_analysis
from dpo_eval.stats.paired import intercept_at_zero, rng_for, sign_agreement_test, wilcoxon, wilcoxon_power


def frame(roles: dict[str, np.ndarray], splits: list[str], names: list[str]) -> pl.DataFrame:
    """features table from {role: n x F array}."""
    ids = [f"p{i}" for i in range(len(splits))]
    return pl.concat([pl.DataFrame(v, schema=names).with_columns(
        pl.Series("pair_id", ids), pl.Series("split", splits), pl.lit(role).alias("role"))
        for role, v in roles.items()])


def row(stats: pl.DataFrame, feature: str, split: str, comparison: str) -> dict:
    part = stats.filter((pl.col("feature") == feature) & (pl.col("split") == split)
                        & (pl.col("comparison") == comparison))
    assert part.height == 1
    return part.row(0, named=True)


# --- sign-flip test of overall sign agreement ------------------------------------------------------------

def test_sign_flip_test_holds_its_level_on_discrete_features():
    """d_tb in {-1, 0, 1}, n = 16, 50 features, symmetric about 0: the null holds, so P(p <= 0.05) <= 0.05
    up to Monte Carlo error. Counting a flipped zero mean as disagreement (while the observed share leaves
    zeros out) rejects about 14% of these null data sets."""
    sims, level, n, n_features = 2000, 0.05, 16, 50
    rejected = 0
    for seed in range(sims):
        rng = np.random.default_rng(seed)
        tb = rng.choice([-1.0, 0.0, 1.0], size=(n, n_features))
        direction = rng.choice([-1.0, 1.0], size=n_features)
        _, p, _ = sign_agreement_test(direction, tb, np.ones(tb.shape, bool), 200, rng)
        rejected += p <= level
    assert rejected / sims <= level + 3 * math.sqrt(level * (1 - level) / sims)


def test_sign_flip_test_finds_real_agreement_on_discrete_features():
    rejected = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        direction = rng.choice([-1.0, 1.0], size=50)
        tb = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.35, 0.45], size=(16, 50)) * direction  # leans toward direction
        _, p, _ = sign_agreement_test(direction, tb, np.ones(tb.shape, bool), 200, rng)
        rejected += p <= 0.05
    assert rejected >= 80


def test_run_analysis_reports_the_calibrated_sign_flip_test():
    rng = np.random.default_rng(7)
    n, names = 16, [f"f{j}" for j in range(30)]
    cr = rng.choice([-1.0, 1.0], size=30) + rng.normal(scale=0.5, size=(n, 30))
    tb = rng.choice([-1.0, 0.0, 1.0], size=(n, 30))
    zeros = np.zeros((n, 30))
    result = run_analysis(frame({"chosen": cr, "rejected": zeros, "tuned": tb, "base": zeros}, ["train"] * n, names),
                          AnalysisSpec(bootstrap=0, permutations=500, seed=3))
    direction, tb_mean = np.sign(cr.mean(axis=0)), tb.mean(axis=0)
    signed = tb_mean != 0
    assert (~signed).any()  # some features have a mean tuned-base delta of exactly 0
    assert result.summary["sign_agreement"]["train"] == np.mean(direction[signed] * np.sign(tb_mean[signed]) == 1)
    assert result.summary["sign_agreement_features"]["train"] == signed.sum()
    _, p, _ = sign_agreement_test(direction, tb, np.ones(tb.shape, bool), 500, rng_for(3, "train", "permutations"))
    assert result.summary["sign_agreement_p"]["train"] == p
    agreement = result.stats.filter((pl.col("comparison") == "tuned_vs_base")
                                    & (pl.col("split") == "train"))["sign_agreement"].to_numpy()
    assert np.array_equal(agreement, direction * np.sign(tb_mean))  # 0 where the mean is 0 but there is a test


# --- length-adjusted delta --------------------------------------------------------------------------------

def test_length_fit_matches_ordinary_least_squares():
    rng = np.random.default_rng(1)
    x = rng.integers(-40, 120, size=50).astype(float)
    y = 2.0 + 0.5 * x + rng.normal(scale=3.0, size=50)
    a, p, why = intercept_at_zero(y, x)
    design = np.column_stack([np.ones(50), x])  # plain normal equations, independent of linregress
    coef = np.linalg.solve(design.T @ design, design.T @ y)
    resid = y - design @ coef
    se = math.sqrt(resid @ resid / 48 * np.linalg.inv(design.T @ design)[0, 0])
    assert a == pytest.approx(coef[0], rel=1e-9) and why == ""
    assert p == pytest.approx(2 * sps.t.sf(abs(coef[0] / se), 48), rel=1e-6)


def test_exact_length_fit_gives_nan_p_with_a_reason():
    rng = np.random.default_rng(0)
    n, names = 40, ["n_tokens", "g"]
    tuned_len = rng.integers(20, 300, size=n).astype(float)
    base_len = rng.integers(20, 300, size=n).astype(float)
    x = tuned_len - base_len
    a, p, why = intercept_at_zero(5.3 * x, x)
    assert math.isnan(p) and "exact" in why
    # through the analysis, where the delta of 5.3 * n_tokens is exact only up to round-off
    other = rng.normal(size=n)
    roles = {"tuned": np.column_stack([tuned_len, 5.3 * tuned_len]), "base": np.column_stack([base_len, 5.3 * base_len]),
             "chosen": np.column_stack([other + 1, other]), "rejected": np.column_stack([other, other - 1])}
    stats = run_analysis(frame(roles, ["train"] * n, names), AnalysisSpec(bootstrap=0, permutations=0)).stats
    g = row(stats, "g", "train", "tuned_vs_base")
    assert math.isnan(g["length_adjusted_p"]) and "exact linear fit" in g["reason"]
    assert "length control" in row(stats, "n_tokens", "train", "tuned_vs_base")["reason"]


# --- seeded streams, q-values, inf ---------------------------------------------------------------------------

def test_changing_permutations_leaves_the_bootstrap_cis_unchanged():
    rng = np.random.default_rng(2)
    n, names = 60, ["n_tokens", "a", "b"]
    base = rng.normal(size=(n, 3))
    roles = {"chosen": base + 0.5 + rng.normal(size=base.shape), "rejected": base + rng.normal(size=base.shape),
             "tuned": base + 0.3 + rng.normal(size=base.shape), "base": base + rng.normal(size=base.shape)}
    features = frame(roles, ["train"] * 40 + ["valid"] * 20, names)
    few = run_analysis(features, AnalysisSpec(bootstrap=300, permutations=50, seed=4)).stats
    many = run_analysis(features, AnalysisSpec(bootstrap=300, permutations=400, seed=4)).stats
    for column in ("ci_low", "ci_high"):
        assert np.array_equal(few[column].to_numpy(), many[column].to_numpy())
    assert np.isfinite(few["ci_low"].to_numpy()).all()


def test_q_values_are_scipy_bh_per_family_with_the_nan_mask_kept():
    rng = np.random.default_rng(5)
    n, names = 50, [f"f{j}" for j in range(8)] + ["same"]
    base = rng.normal(size=(n, 9))
    tuned = base + np.r_[np.zeros(4), np.full(4, 0.6), 0.0] + rng.normal(size=base.shape)
    tuned[:, -1] = base[:, -1]  # "same": tuned equals base, so no test and no q
    roles = {"chosen": base + 0.4 + rng.normal(size=base.shape), "rejected": base, "tuned": tuned, "base": base}
    stats = run_analysis(frame(roles, ["train"] * 35 + ["valid"] * 15, names), AnalysisSpec(bootstrap=0, permutations=0)).stats
    for (comparison, split), part in stats.group_by("comparison", "split"):
        p, q = part["p_value"].to_numpy(), part["q_value"].to_numpy()
        ok = ~np.isnan(p)
        assert np.array_equal(np.isnan(q), ~ok)
        assert np.allclose(q[ok], sps.false_discovery_control(p[ok], method="bh"))
        family = part["q_family"].unique().to_list()
        assert len(family) == 1 and comparison in family[0] and split in family[0] and f"{ok.sum()} features" in family[0]
    assert math.isnan(row(stats, "same", "train", "tuned_vs_base")["q_value"])


def test_infinite_values_are_dropped_with_their_own_reason():
    rng = np.random.default_rng(6)
    n = 12
    values = {r: rng.normal(size=(n, 2)) for r in ("chosen", "rejected", "tuned", "base")}
    values["tuned"][3, 0] = np.inf
    values["base"][5, 0] = -np.inf
    values["chosen"][7, 0] = np.nan  # a NaN is dropped too, but it is not an infinity
    result = run_analysis(frame(values, ["train"] * n, ["x", "y"]), AnalysisSpec(bootstrap=0, permutations=0))
    for comparison in ("chosen_vs_rejected", "tuned_vs_base"):
        x = row(result.stats, "x", "train", comparison)
        assert x["n"] == n - 3 and "2 records dropped for +/-inf" in x["reason"]
        assert "inf" not in row(result.stats, "y", "train", comparison)["reason"]
    assert result.summary["dropped_inf"] == {"train": {"x": 2}, "valid": {}}


# --- scale without a train split; the summary fields the report uses --------------------------------------------

def test_no_train_split_uses_the_valid_std_and_says_so():
    rng = np.random.default_rng(8)
    n = 30
    cr, tb = rng.normal(0.5, 1.0, size=n), rng.normal(0.3, 1.0, size=n)
    zeros = np.zeros((n, 1))
    features = frame({"chosen": cr[:, None], "rejected": zeros, "tuned": tb[:, None], "base": zeros}, ["valid"] * n, ["x"])
    result = run_analysis(features, AnalysisSpec(bootstrap=200, permutations=0))
    r = row(result.stats, "x", "valid", "tuned_vs_base")
    assert r["scale"] == pytest.approx(np.std(cr, ddof=1))
    assert r["norm_mean_delta"] == pytest.approx(tb.mean() / np.std(cr, ddof=1))
    assert np.isfinite(r["ci_low"])
    assert result.summary["scale_source"].startswith("valid (no train split")
    with_train = frame({"chosen": cr[:, None], "rejected": zeros, "tuned": tb[:, None], "base": zeros},
                       ["train"] * 20 + ["valid"] * 10, ["x"])
    assert run_analysis(with_train, AnalysisSpec(bootstrap=0, permutations=0)).summary["scale_source"] == "train"


@pytest.mark.parametrize("n", [12, 30, 60])
def test_wilcoxon_power_matches_a_simulation(n):
    """Share of 4,000 seeded normal samples (mean 0.5, sd 1) that scipy's Wilcoxon test rejects at 0.05."""
    x = np.random.default_rng(n).normal(0.5, 1.0, size=(4000, n))
    simulated = np.mean(sps.wilcoxon(x, axis=1).pvalue <= 0.05)
    assert wilcoxon_power(n, 0.5, 0.05) == pytest.approx(simulated, abs=0.03)


def test_wilcoxon_power_is_zero_where_the_exact_test_cannot_reject():
    for n in range(1, 6):  # smallest exact two-sided p 2 / 2^n > 0.05
        assert wilcoxon_power(n, 0.5, 0.05) == 0.0
        assert sps.wilcoxon(np.arange(1.0, n + 1)).pvalue > 0.05  # all positive: the most extreme sample
    assert wilcoxon_power(12_000, 0.5, 0.05) == pytest.approx(1.0)  # and no overflow at the scale of a real run
    assert wilcoxon(np.arange(1.0, 5001))[2] == ""


def test_summary_power_alpha_and_length_sign_share():
    rng = np.random.default_rng(9)
    n, names = 40, ["n_tokens", "x"]
    splits = ["train"] * 30 + ["valid"] * 10
    base = rng.normal(size=(n, 2))
    tuned = base + rng.normal(size=(n, 2))
    tuned[:30, 0] = base[:30, 0] + np.r_[np.full(27, 5.0), np.full(3, -5.0)]  # train: 27 of 30 longer
    tuned[30:, 0] = base[30:, 0] + np.r_[np.full(5, 4.0), np.full(4, -4.0), 0.0]  # valid: 5 longer, 4 shorter, 1 same
    roles = {"chosen": base + 1 + rng.normal(size=(n, 2)), "rejected": base, "tuned": tuned, "base": base}
    summary = run_analysis(frame(roles, splits, names), AnalysisSpec(alpha=0.1, bootstrap=0, permutations=0)).summary
    assert summary["alpha"] == 0.1
    assert summary["length_sign_share"] == {"train": pytest.approx(0.9), "valid": pytest.approx(0.5)}
    assert summary["power"]["valid"]["n"] == 10 and summary["power"]["valid"]["shift"] == 0.5
    assert summary["power"]["train"]["power"] == pytest.approx(wilcoxon_power(30, 0.5, 0.1))
    without = frame({r: v[:, 1:] for r, v in roles.items()}, splits, ["x"])
    assert run_analysis(without, AnalysisSpec(bootstrap=0, permutations=0)).summary["length_sign_share"] == {}
