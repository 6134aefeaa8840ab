"""Paired statistics on cases whose answers are known in advance."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.stats.analysis import AnalysisSpec, analyze, run_analysis
from dpo_eval.stats.paired import benjamini_hochberg, rank_biserial

# Hollander & Wolfe, Nonparametric Statistical Methods (2nd ed., 1999), p. 39, Example 3.1: Hamilton
# depression scale factor IV of nine patients at the first (x) and second (y) visit. The signed-rank
# statistic is T+ = 40, one-sided exact p = 0.01953125 (10/512), so two-sided p = 0.0390625.
HW_X = [1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30]
HW_Y = [0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29]
FAST = AnalysisSpec(bootstrap=0, permutations=0)


def table(values: dict[str, dict[str, list[float]]], splits: list[str]) -> pl.DataFrame:
    """features table from {role: {feature: per-pair values}}."""
    rows = []
    for role, feats in values.items():
        for i, split in enumerate(splits):
            rows.append({"pair_id": f"p{i}", "split": split, "role": role} | {f: v[i] for f, v in feats.items()})
    return pl.DataFrame(rows)


def row(stats: pl.DataFrame, feature: str, split: str, comparison: str) -> dict:
    part = stats.filter((pl.col("feature") == feature) & (pl.col("split") == split)
                        & (pl.col("comparison") == comparison))
    assert part.height == 1
    return part.row(0, named=True)


def random_table(rng, n_pairs: int, n_features: int, shift: np.ndarray | None = None, valid_share=0.3):
    shift = np.zeros(n_features) if shift is None else shift
    names = ["n_tokens"] + [f"f{j}" for j in range(1, n_features)]
    splits = ["valid" if i < n_pairs * valid_share else "train" for i in range(n_pairs)]
    base = rng.normal(size=(n_pairs, n_features))
    roles = {"chosen": base + 0.5 + rng.normal(size=base.shape), "rejected": base + rng.normal(size=base.shape),
             "tuned": base + shift + rng.normal(size=base.shape), "base": base + rng.normal(size=base.shape)}
    return table({r: {n: v[:, j].tolist() for j, n in enumerate(names)} for r, v in roles.items()}, splits)


def test_wilcoxon_published_example_through_analyze():
    features = table({"chosen": {"x": HW_X}, "rejected": {"x": HW_Y},
                      "tuned": {"x": HW_X}, "base": {"x": HW_Y}}, ["train"] * 9)
    r = row(analyze(features, FAST), "x", "train", "chosen_vs_rejected")
    assert r["p_value"] == pytest.approx(0.0390625, abs=1e-12)
    assert r["wilcoxon_stat"] == 5.0  # min(T+, T-) = min(40, 5)
    assert r["effect_size"] == pytest.approx((40 - 5) / 45)
    d = np.array(HW_X) - np.array(HW_Y)
    assert r["scale"] == pytest.approx(np.std(d, ddof=1))
    assert r["norm_mean_delta"] == pytest.approx(d.mean() / np.std(d, ddof=1))


def test_nan_in_one_role_drops_that_record_for_that_feature_only():
    rng = np.random.default_rng(3)
    features = random_table(rng, 40, 3)
    full = analyze(features, FAST)
    holed = features.with_columns(
        pl.when((pl.col("pair_id") == "p20") & (pl.col("role") == "tuned")).then(float("nan"))
        .otherwise(pl.col("f1")).alias("f1"))
    stats = analyze(holed, FAST)
    for comparison in ("chosen_vs_rejected", "tuned_vs_base"):
        assert row(stats, "f1", "train", comparison)["n"] == row(full, "f1", "train", comparison)["n"] - 1
        kept, before = row(stats, "f2", "train", comparison), row(full, "f2", "train", comparison)
        for column in ("n", "mean_delta", "scale", "p_value", "effect_size", "wilcoxon_stat"):
            assert kept[column] == before[column]  # (q-values move: BH is across features)
    dropped = analyze(features.filter(pl.col("pair_id") != "p20"), FAST)
    for column in ("mean_delta", "scale", "p_value", "effect_size"):
        assert row(stats, "f1", "train", "chosen_vs_rejected")[column] == pytest.approx(
            row(dropped, "f1", "train", "chosen_vs_rejected")[column])
    # a missing row (null) counts as NaN too
    missing = features.filter(~((pl.col("pair_id") == "p20") & (pl.col("role") == "base")))
    assert row(analyze(missing, FAST), "f2", "train", "tuned_vs_base")["n"] == row(full, "f2", "train", "tuned_vs_base")["n"] - 1


def test_train_only_scale_is_applied_to_valid():
    cr_train = [1.0, 2.0, 4.0, 7.0]
    cr_valid = [10.0, 30.0]
    splits = ["train"] * 4 + ["valid"] * 2
    zeros = [0.0] * 6
    features = table({"chosen": {"x": cr_train + cr_valid}, "rejected": {"x": zeros},
                      "tuned": {"x": [1.0, 1.0, 1.0, 1.0, 3.0, 5.0]}, "base": {"x": zeros}}, splits)
    stats = analyze(features, FAST)
    scale = np.std(cr_train, ddof=1)
    for comparison, valid_mean in (("chosen_vs_rejected", 20.0), ("tuned_vs_base", 4.0)):
        r = row(stats, "x", "valid", comparison)
        assert r["scale"] == pytest.approx(scale)
        assert r["norm_mean_delta"] == pytest.approx(valid_mean / scale)


def test_sign_agreement_on_planted_effects_both_ways():
    rng = np.random.default_rng(5)
    n = 60
    base = rng.normal(size=n)
    noise = lambda: rng.normal(scale=0.1, size=n)  # noqa: E731
    features = table({
        "chosen": {"up": (base + 1 + noise()).tolist(), "down": (base + 1 + noise()).tolist()},
        "rejected": {"up": (base + noise()).tolist(), "down": (base + noise()).tolist()},
        "tuned": {"up": (base + 1 + noise()).tolist(), "down": (base - 1 + noise()).tolist()},
        "base": {"up": (base + noise()).tolist(), "down": (base + noise()).tolist()},
    }, ["train"] * 40 + ["valid"] * 20)
    stats = analyze(features, FAST)
    for split in ("train", "valid"):
        for comparison in ("chosen_vs_rejected", "tuned_vs_base"):
            assert row(stats, "up", split, comparison)["sign_agreement"] == 1
            assert row(stats, "down", split, comparison)["sign_agreement"] == -1


def test_bh_q_values_equal_a_direct_computation():
    rng = np.random.default_rng(11)
    features = random_table(rng, 80, 12, shift=np.r_[np.zeros(6), np.full(6, 0.6)])
    stats = analyze(features, FAST)
    part = stats.filter((pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "train"))
    p = part["p_value"].to_numpy()
    m = len(p)
    direct = [min(min(sorted(p)[k] * m / (k + 1) for k in range(i, m)), 1.0) for i in range(m)]
    rank = np.argsort(np.argsort(p))
    assert np.allclose(part["q_value"].to_numpy(), np.array(direct)[rank])
    assert np.allclose(benjamini_hochberg(p), sps.false_discovery_control(p, method="bh"))
    assert np.isnan(benjamini_hochberg(np.array([np.nan, 0.01]))[0])


def test_effect_size_known_answers():
    assert rank_biserial(np.array([1.0, 2.0, 3.0])) == 1.0
    assert rank_biserial(np.array([-1.0, -2.0, 0.0])) == -1.0
    # ranks 1..4; W+ = 1 + 4 = 5, W- = 2 + 3 = 5 -> 0
    assert rank_biserial(np.array([1.0, -2.0, -3.0, 4.0])) == 0.0


def test_null_keeps_false_discoveries_at_or_under_alpha_and_planted_shift_is_found():
    shares = []
    for seed in range(40):
        stats = analyze(random_table(np.random.default_rng(seed), 60, 15), FAST)
        tb = stats.filter(pl.col("comparison") == "tuned_vs_base")
        shares.append(float((tb["q_value"] < 0.05).mean()))
    assert np.mean(shares) <= 0.05
    shift = np.r_[np.zeros(10), np.full(5, 1.0)]
    stats = analyze(random_table(np.random.default_rng(99), 60, 15, shift=shift), FAST)
    found = stats.filter((pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "train")
                         & (pl.col("q_value") < 0.05))["feature"].to_list()
    assert set(found) >= {f"f{j}" for j in range(10, 15)}


def test_bootstrap_ci_is_seeded_and_covers_the_estimate():
    features = random_table(np.random.default_rng(2), 100, 4, shift=np.full(4, 0.5))
    a = analyze(features, AnalysisSpec(bootstrap=500, seed=1, permutations=0))
    b = analyze(features, AnalysisSpec(bootstrap=500, seed=1, permutations=0))
    assert a.equals(b)
    assert ((a["ci_low"] <= a["norm_mean_delta"]) & (a["norm_mean_delta"] <= a["ci_high"])).all()
    c = analyze(features, AnalysisSpec(bootstrap=500, seed=2, permutations=0))
    assert not np.allclose(a["ci_low"].to_numpy(), c["ci_low"].to_numpy())


def test_sign_agreement_test_and_length_control():
    rng = np.random.default_rng(4)
    n = 120
    dlen = rng.normal(5, 3, size=n)  # tuned answers are longer
    names = ["n_tokens", "g_length_only", "h_real_shift"]
    zeros = np.zeros(n)
    cr = {"n_tokens": 1 + rng.normal(size=n), "g_length_only": 1 + rng.normal(size=n),
          "h_real_shift": 1 + rng.normal(size=n)}
    tb = {"n_tokens": dlen, "g_length_only": 0.5 * dlen + rng.normal(scale=0.3, size=n),
          "h_real_shift": 2.0 + 0.5 * dlen + rng.normal(scale=0.3, size=n)}
    features = table({"chosen": {k: cr[k].tolist() for k in names}, "rejected": {k: zeros.tolist() for k in names},
                      "tuned": {k: tb[k].tolist() for k in names}, "base": {k: zeros.tolist() for k in names}},
                     ["train"] * n)
    result = run_analysis(features, AnalysisSpec(bootstrap=0, permutations=500))
    g = row(result.stats, "g_length_only", "train", "tuned_vs_base")
    h = row(result.stats, "h_real_shift", "train", "tuned_vs_base")
    assert g["p_value"] < 1e-6 and g["length_adjusted_p"] > 0.01  # only "it got longer"
    assert h["length_adjusted_delta"] == pytest.approx(2.0, abs=0.3) and h["length_adjusted_p"] < 1e-6
    assert result.summary["sign_agreement"]["train"] == 1.0
    # all three deltas move with one length delta: one effective feature, so agreement could be chance
    assert result.summary["sign_agreement_p"]["train"] > 0.2


def test_sign_agreement_p_small_for_independent_agreeing_features_and_uniformish_under_null():
    shift = np.full(20, 0.4)
    agreeing = run_analysis(random_table(np.random.default_rng(21), 80, 20, shift=shift),
                            AnalysisSpec(bootstrap=0, permutations=1000))
    assert agreeing.summary["sign_agreement"]["train"] >= 0.9
    assert agreeing.summary["sign_agreement_p"]["train"] < 0.01
    null_p = [run_analysis(random_table(np.random.default_rng(s), 60, 20), AnalysisSpec(bootstrap=0, permutations=200))
              .summary["sign_agreement_p"]["train"] for s in range(30)]
    assert np.mean(np.array(null_p) < 0.05) <= 0.15  # about 5% of 30 null runs


DEGENERATE = {  # case: (per-role values of x, splits); each case differs from every other
    "all_zero": ({r: [0.0] * 8 for r in ("chosen", "rejected", "tuned", "base")}, ["train"] * 8),
    "constant_nonzero_deltas": ({"chosen": [2.0] * 8, "rejected": [1.0] * 8, "tuned": [3.0] * 8, "base": [1.0] * 8},
                                ["train"] * 8),
    "one_record": ({"chosen": [2.0], "rejected": [1.0], "tuned": [3.0], "base": [1.0]}, ["train"]),
    "two_records": ({"chosen": [2.0, 5.0], "rejected": [1.0, 1.0], "tuned": [3.0, 1.0], "base": [1.0, 2.0]},
                    ["train"] * 2),
    "no_valid_split": ({"chosen": [float(i * i) for i in range(8)], "rejected": [0.0] * 8,
                        "tuned": [float(i) for i in range(8)], "base": [0.0] * 8}, ["train"] * 8),
    "zero_scale": ({"chosen": [1.0] * 8, "rejected": [1.0] * 8, "tuned": [float(i) for i in range(8)],
                    "base": [0.0] * 8}, ["train"] * 8),
    "zero_width_ci": ({"chosen": [float(i * i) for i in range(8)] + [4.0] * 4, "rejected": [0.0] * 12,
                       "tuned": [float(i) for i in range(8)] + [2.0] * 4, "base": [0.0] * 12},
                      ["train"] * 8 + ["valid"] * 4),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_inputs_carry_a_reason(case):
    values, splits = DEGENERATE[case]
    result = run_analysis(table({r: {"x": v} for r, v in values.items()}, splits),
                          AnalysisSpec(bootstrap=100, permutations=100))
    stats = result.stats
    assert stats.height == 4  # x train/valid, both comparisons
    json.dumps(result.summary)  # serialisable
    no_test = stats.filter(pl.col("p_value").is_nan())
    assert (no_test["reason"] != "").all() and no_test["sign_agreement"].is_nan().all()
    train = stats.filter(pl.col("split") == "train")
    cr, tb = (row(stats, "x", "train", c) for c in ("chosen_vs_rejected", "tuned_vs_base"))
    if "valid" not in splits:  # its rows say "no records"
        valid = stats.filter(pl.col("split") == "valid")
        assert (valid["n"] == 0).all() and valid["reason"].str.contains("no records").all()
    if case == "all_zero":
        assert train["reason"].str.contains("all deltas zero").all() and train["reason"].str.contains("zero scale").all()
        assert train["p_value"].is_nan().all() and train["sign_agreement"].is_nan().all()
    elif case == "constant_nonzero_deltas":  # a real test (8 of 8 positive), but no scale to normalise by
        assert cr["p_value"] == pytest.approx(sps.wilcoxon([1.0] * 8).pvalue) and cr["sign_agreement"] == 1
        assert train["reason"].str.contains("zero scale").all() and train["norm_mean_delta"].is_nan().all()
    elif case == "one_record":
        assert train["reason"].str.contains("no scale").all() and train["scale"].is_nan().all()
        assert train["reason"].str.contains("only 1 nonzero deltas").all()
    elif case == "two_records":
        assert train["reason"].str.contains("smallest possible two-sided p is 0.5").all()
    elif case == "no_valid_split":
        assert cr["reason"] == "no n_tokens feature for length control" and cr["sign_agreement"] == 1
    elif case == "zero_scale":  # chosen never differs from rejected: no test, no direction
        assert math.isnan(cr["p_value"]) and math.isnan(tb["sign_agreement"]) and tb["p_value"] < 0.05
        assert "no sign agreement: chosen_vs_rejected has no test" in tb["reason"]
    elif case == "zero_width_ci":
        valid_tb = row(stats, "x", "valid", "tuned_vs_base")
        assert valid_tb["ci_low"] == valid_tb["ci_high"] and "zero-width CI" in valid_tb["reason"]
        assert "zero-width CI" not in tb["reason"]


def test_cli_analyze_writes_every_file(tmp_path):
    features = random_table(np.random.default_rng(8), 50, 5, shift=np.full(5, 0.7))
    path = tmp_path / "features.parquet"
    features.write_parquet(path)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dpo_eval", "analyze", "--features", str(path),
                             "--out", str(out), "--bootstrap", "200"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in ("stats.parquet", "stats.csv", "summary.json", "report.html"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    for key in ("n_pairs", "n_features", "sign_agreement", "sign_agreement_p", "significant"):
        assert key in summary
    assert len(summary["sentences"]) == 3
    images = re.findall(r'<img src="([^"]+)"', (out / "report.html").read_text())
    assert len(images) >= 4 and all(image.startswith("data:image/png;base64,") for image in images)  # inlined
    assert len(list((out / "plots").glob("*.png"))) >= 4  # and still written beside the report
    stats = pl.read_parquet(out / "stats.parquet")
    assert stats.height == 5 * 2 * 2
    expected = {"feature", "split", "comparison", "n", "mean_delta", "norm_mean_delta", "scale", "ci_low", "ci_high",
                "wilcoxon_stat", "p_value", "q_value", "effect_size", "sign_agreement"}
    assert expected <= set(stats.columns)
    assert math.isfinite(summary["sign_agreement_p"]["train"])


def test_bad_features_table_is_a_clear_error(tmp_path):
    from dpo_eval.errors import DpoEvalError

    with pytest.raises(DpoEvalError, match="lacks the columns"):
        analyze(pl.DataFrame({"pair_id": ["a"], "x": [1.0]}))
    with pytest.raises(DpoEvalError, match="unknown roles"):
        analyze(pl.DataFrame({"pair_id": ["a"], "split": ["train"], "role": ["good"], "x": [1.0]}))
    two_prompts = pl.DataFrame({"pair_id": ["a", "a"], "split": ["train"] * 2, "role": ["tuned", "base"],
                                "prompt_id": ["q1", "q2"], "x": [1.0, 0.0]})
    with pytest.raises(DpoEvalError, match="a pair_id has two prompt_ids"):
        analyze(two_prompts)


def test_tuned_vs_base_bootstrap_resamples_prompts_and_distinct_prompts_change_nothing():
    """prompt_id naming every pair apart gives the very table of no prompt_id; a prompt asked twice (its tuned and
    base rows shared) gives the table of that prompt asked once for tuned vs base, CI included."""
    rng = np.random.default_rng(5)
    features = random_table(rng, 30, 3)
    spec = AnalysisSpec(bootstrap=200, permutations=100, seed=2)
    plain = run_analysis(features, spec)
    own = run_analysis(features.with_columns(pl.col("pair_id").alias("prompt_id")), spec)
    assert own.stats.equals(plain.stats)
    # p29 (train) asks p28's prompt again with its own chosen and rejected answers
    again = features.with_columns(pl.col("pair_id").alias("prompt_id")).with_columns(
        pl.when(pl.col("pair_id") == "p29").then(pl.lit("p28")).otherwise(pl.col("prompt_id")).alias("prompt_id"))
    shared = {r: again.filter((pl.col("pair_id") == "p28") & (pl.col("role") == r)) for r in ("tuned", "base")}
    again = pl.concat([again.filter(~((pl.col("pair_id") == "p29") & pl.col("role").is_in(["tuned", "base"]))),
                       *(s.with_columns(pl.lit("p29").alias("pair_id")) for s in shared.values())])
    once = features.filter(~((pl.col("pair_id") == "p29") & pl.col("role").is_in(["tuned", "base"])))
    once = once.filter(pl.col("pair_id") != "p29")
    twice, single = run_analysis(again, spec).stats, run_analysis(once, spec).stats
    key = ["feature", "split", "comparison"]
    tb = [s.filter(pl.col("comparison") == "tuned_vs_base").sort(key) for s in (twice, single)]
    columns = ["n", "mean_delta", "wilcoxon_stat", "p_value", "effect_size", "length_adjusted_delta"]
    assert tb[0].select(columns).equals(tb[1].select(columns))
    for bound in ("ci_low", "ci_high"):  # the same prompts resampled: the same means (S_j differs: p29's d_cr)
        means = [(t[bound] * t["scale"]).to_numpy() for t in tb]
        np.testing.assert_allclose(means[0], means[1], rtol=1e-12)
    cr = twice.filter((pl.col("comparison") == "chosen_vs_rejected") & (pl.col("split") == "train"))
    assert cr["n"].max() == 21  # 30 pairs, 30% valid: 21 train pairs, p29 among them


def test_small_tied_samples_give_scipys_exact_permutation_p():
    """n <= 13 with ties or zeros: scipy enumerates every sign flip, one statistic call each; dpo_eval's
    wilcoxon evaluates them at once and must give scipy's very p and statistic."""
    from scipy import stats as sps

    from dpo_eval.stats.paired import wilcoxon

    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(2, 14))
        d = np.round(rng.normal(size=n), int(rng.integers(0, 2)))
        d[: int(rng.integers(0, n // 2 + 1))] = 0.0
        if not d.any():
            continue
        reference = sps.wilcoxon(d)
        stat, p, _ = wilcoxon(d)
        assert p == reference.pvalue and stat == reference.statistic, d
        checked += 1
    assert checked > 100
