"""Judge statistics against cases whose answer is known in advance: hand-made verdicts, counts checked
against scipy, planted rates and planted length or quality preferences."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.statistics import combine_orders, judge_summary, lc_win_rate, position_consistency

ROLES = {"tuned_vs_base": ("tuned", "base"), "chosen_vs_rejected": ("chosen", "rejected")}
CONTRACT = {"tuned_vs_base": {"n", "wins", "losses", "ties", "win_rate", "ci_low", "ci_high", "p_value",
                              "lc_win_rate", "position_consistency", "first_position_rate"},
            "chosen_vs_rejected": {"n", "agreement", "ci_low", "ci_high", "position_consistency"}}


def row(pair_id, order, winner, comparison="tuned_vs_base", split="valid", judge="j"):
    """One judgment whose verdict follows from the winner role (or tie / invalid) and the order."""
    a, b = ROLES[comparison]
    shown_first = a if order == "ab" else b
    verdict = winner if winner in ("tie", "invalid") else ("first" if winner == shown_first else "second")
    return {"pair_id": str(pair_id), "split": split, "comparison": comparison, "judge": judge, "order": order,
            "shown_first": shown_first, "verdict": verdict, "winner": winner, "p_first": None, "raw": verdict,
            "truncated": False, "prompt_tokens": 10, "completion_tokens": 1, "latency_s": 0.1, "cached": False}


def pairs(winners, comparison="tuned_vs_base", split="valid"):
    """Judgments from {pair_id: (winner in order ab, winner in order ba)}; None leaves that order out."""
    return pl.DataFrame([row(p, o, w, comparison, split) for p, ws in winners.items()
                         for o, w in zip(("ab", "ba"), ws) if w is not None])


def consistent_pairs(counts, comparison="tuned_vs_base"):
    """Pairs judged the same way in both orders: counts = {winner: how many pairs}."""
    winners = [w for w, k in counts.items() for _ in range(k)]
    return pairs({i: (w, w) for i, w in enumerate(winners)}, comparison)


def lengths_frame(length_diff, split="valid"):
    """Base answers 100 long, tuned answers 100 + length_diff (pair i gets length_diff[i])."""
    return pl.DataFrame([{"pair_id": str(i), "split": split, "role": role, "length": 100 + d * (role == "tuned")}
                         for i, d in enumerate(length_diff) for role in ("tuned", "base")])


def test_combine_orders_on_hand_made_verdicts():
    judgments = pairs({"agree": ("tuned", "tuned"), "agree_tie": ("tie", "tie"), "disagree": ("tuned", "base"),
                       "half_tie": ("base", "tie"), "invalid": ("invalid", "tuned"), "missing": ("tuned", None)})
    combined = combine_orders(judgments)
    winner = dict(zip(combined["pair_id"], combined["winner"]))
    assert winner == {"agree": "tuned", "agree_tie": "tie", "disagree": "tie", "half_tie": "tie",
                      "invalid": "invalid", "missing": "incomplete"}
    # 2 of the 4 pairs with two valid verdicts name the same winner (a shared tie counts as agreement).
    assert position_consistency(combined) == 0.5
    assert combined.filter(pl.col("pair_id") == "invalid")["consistent"].item() is None


def test_sign_test_equals_binomtest_on_the_counts():
    block = judge_summary(consistent_pairs({"tuned": 30, "base": 18, "tie": 7}), n_boot=0)["splits"]["valid"]
    tvb = block["tuned_vs_base"]
    assert (tvb["n"], tvb["wins"], tvb["losses"], tvb["ties"]) == (55, 30, 18, 7)
    assert tvb["p_value"] == pytest.approx(sps.binomtest(30, 48, 0.5).pvalue, rel=1e-12)
    assert tvb["win_rate"] == pytest.approx((30 + 7 / 2) / 55)
    assert "ties excluded" in tvb["sign_test"]
    assert CONTRACT["tuned_vs_base"] <= set(tvb)


def test_invalid_verdicts_are_counted_not_ties():
    judgments = pairs({"a": ("tuned", "tuned"), "b": ("invalid", "base"), "c": ("invalid", "invalid"),
                       "d": ("tie", "tie")})
    summary = judge_summary(judgments, n_boot=0)
    tvb = summary["splits"]["valid"]["tuned_vs_base"]
    assert summary["invalid"] == 3  # per-order verdicts
    assert (tvb["invalid"], tvb["n"], tvb["ties"], tvb["wins"], tvb["losses"]) == (2, 2, 1, 1, 0)
    assert tvb["win_rate"] == pytest.approx(0.75)
    # a valid order beside an invalid one still counts in the first-position rate: b's 'second' (base, shown
    # second in ba) -> valid verdicts first, first (a), second (b), tie, tie (d): 2 of 5
    assert tvb["first_position_rate"] == pytest.approx(2 / 5)


def test_first_position_rate_detects_a_judge_that_always_says_first():
    # shown first wins: tuned in order ab, base in order ba
    judgments = pairs({i: ("tuned", "base") for i in range(40)})
    assert set(judgments["verdict"]) == {"first"}
    tvb = judge_summary(judgments, n_boot=200)["splits"]["valid"]["tuned_vs_base"]
    assert tvb["first_position_rate"] == 1.0
    assert tvb["position_consistency"] == 0.0
    assert (tvb["ties"], tvb["win_rate"]) == (40, 0.5)
    # 40 ties count as 20 of 40 (Wilson): the interval says how little 40 ties tell, not [0.5, 0.5]
    assert (tvb["ci_low"], tvb["ci_high"]) == pytest.approx(tuple(sps.binomtest(20, 40).proportion_ci(method="wilson")))
    assert math.isnan(tvb["p_value"])  # no decided pair


def test_chosen_vs_rejected_agreement_counts_ties_half():
    judgments = consistent_pairs({"chosen": 6, "rejected": 2, "tie": 2}, comparison="chosen_vs_rejected")
    cvr = judge_summary(judgments, n_boot=500)["splits"]["valid"]["chosen_vs_rejected"]
    assert CONTRACT["chosen_vs_rejected"] <= set(cvr)
    assert (cvr["n"], cvr["agreement"], cvr["position_consistency"]) == (10, 0.7, 1.0)
    assert cvr["ci_low"] < 0.7 < cvr["ci_high"]


def test_ci_is_wilson_on_wins_plus_half_ties_as_statsmodels_computes_it():
    from statsmodels.stats.proportion import proportion_confint

    cases = [({"tuned": 29}, 29.0, 29), ({"tuned": 6, "base": 2, "tie": 3}, 7.5, 11), ({"base": 5}, 0.0, 5)]
    for counts, k, n in cases:
        tvb = judge_summary(consistent_pairs(counts), n_boot=0)["splits"]["valid"]["tuned_vs_base"]
        low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert tvb["n"] == n and tvb["ci_low"] == pytest.approx(low, abs=1e-12)
        assert tvb["ci_high"] == pytest.approx(high, abs=1e-12)
    cvr = judge_summary(consistent_pairs({"chosen": 29}, comparison="chosen_vs_rejected"),
                        n_boot=0)["splits"]["valid"]["chosen_vs_rejected"]
    assert cvr["ci_high"] == pytest.approx(1.0) and cvr["ci_low"] < 0.9  # 29 of 29 is not [1, 1]


def test_agreement_ci_covers_a_true_095_at_n_30():
    # The audit's case: a percentile bootstrap covered a true agreement of 0.95 in 0.78 of samples at n = 30.
    # The coverage of the intervals judge_summary reports, for every possible count k of 30 agreements, summed over
    # the binomial: a 95% interval that covers a true 0.95 less than 0.90 of the time fails.
    n, truth = 30, 0.95
    coverage = 0.0
    for k in range(n + 1):
        counts = {"chosen": k, "rejected": n - k} if k < n else {"chosen": n}
        cvr = judge_summary(consistent_pairs({c: m for c, m in counts.items() if m}, comparison="chosen_vs_rejected"),
                            n_boot=0)["splits"]["valid"]["chosen_vs_rejected"]
        coverage += sps.binom.pmf(k, n, truth) * (cvr["ci_low"] <= truth <= cvr["ci_high"])
    assert coverage > 0.90


def test_lc_removes_a_deterministic_length_preference():
    # Length is the only difference: the longer answer always wins, equal lengths tie. Tuned is longer in
    # 6 of 9 length steps, so the raw win rate is far above 1/2. The unpenalised fit is quasi-separated:
    # its limit predicts exactly 1/2 at zero difference (only the ties sit there). 0.02 leaves room for the
    # optimiser's stopping rule (gradient 1e-4 on the mean loss, ties about 1/9 of the weight: ~1e-3).
    diff = np.random.default_rng(0).integers(-2, 7, size=300)
    winner = np.where(diff > 0, "tuned", np.where(diff < 0, "base", "tie"))
    summary = judge_summary(pairs({i: (w, w) for i, w in enumerate(winner)}), lengths_frame(diff), n_boot=0)
    tvb = summary["splits"]["valid"]["tuned_vs_base"]
    assert tvb["win_rate"] > 0.7
    assert tvb["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    assert "quasi-complete separation" in tvb["lc_reason"]


def test_lc_removes_a_noisy_length_preference():
    # P(tuned wins an order) = sigmoid(4 tanh(d / sd(d))), each order drawn apart: the fitted model is the
    # true one with intercept 0, so LC is 1/2 up to sampling. Over 100 seeds of this design (2000 pairs) the
    # LC rate had mean 0.499 and sd 0.014 (largest miss 0.04); 0.05 is about 3.5 sd. The raw rate sits near
    # 0.72 (sd 0.01).
    n = 2000
    rng = np.random.default_rng(11)
    diff = rng.normal(40, 60, size=n)
    p = 1 / (1 + np.exp(-4 * np.tanh(diff / diff.std())))
    won = rng.random((n, 2)) < p[:, None]
    winners = {i: tuple("tuned" if w else "base" for w in won[i]) for i in range(n)}
    tvb = judge_summary(pairs(winners), lengths_frame(diff), n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert tvb["win_rate"] > 0.65
    assert tvb["lc_win_rate"] == pytest.approx(0.5, abs=0.05)
    assert tvb["lc_reason"] == ""


def test_lc_keeps_a_quality_preference():
    # Tuned wins 80% of pairs (both orders) whatever the lengths, and is longer on average. Over 200 seeds of
    # this design the LC rate had mean 0.801 and sd 0.015; 0.05 is about 3 sd.
    rng = np.random.default_rng(12)
    diff = rng.normal(40, 60, size=1000)
    winner = np.where(rng.random(1000) < 0.8, "tuned", "base")
    tvb = judge_summary(pairs({i: (w, w) for i, w in enumerate(winner)}), lengths_frame(diff),
                        n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert tvb["win_rate"] == pytest.approx(0.8, abs=0.03)
    assert tvb["lc_win_rate"] == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("outcome, diff, reason", [
    ([1, 1, 1, 1], [1, 2, 3, 4], "every valid pair is a win"),
    ([0, 0, 0.0], [1, 2, 3], "every valid pair is a loss"),
    ([1, 0, 0.5, 1], [5, 5, 5, 5], "no length variation"),
    ([1, 1, 0, 0], [3, 2, -1, -2], "complete separation"),
    ([1, 0], [np.nan, np.nan], "no valid tuned-vs-base pair"),
    ([], [], "no valid tuned-vs-base pair"),
])
def test_lc_degenerate_cases_give_nan_and_a_reason(outcome, diff, reason):
    rate, why = lc_win_rate(np.array(outcome, float), np.array(diff, float))
    assert math.isnan(rate) and reason in why


def test_lc_is_fitted_on_the_pairs_the_win_rate_counts():
    # The audit's case: tuned shown first wins, tuned shown second ties, in every pair. Combined, every pair is a
    # tie: win rate 1/2. Fitted on per-order verdicts the LC rate was 0.75 with no length effect at all; on the
    # per-pair rows every outcome is 1/2, so the fit's intercept is 0 and LC is 1/2 too.
    diff = np.random.default_rng(3).normal(0, 20, size=200)
    tvb = judge_summary(pairs({i: ("tuned", "tie") for i in range(200)}), lengths_frame(diff),
                        n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert tvb["win_rate"] == 0.5
    assert tvb["lc_win_rate"] == pytest.approx(0.5, abs=1e-3)


def test_lc_matches_the_win_rate_when_length_plays_no_part():
    # Per-order tuned/base/tie = .5/.2/.3 drawn apart, lengths independent of the verdicts, n = 200. The audit
    # measured LC - win rate = 0.044 +/- 0.001 over 200 runs with per-order rows; on per-pair rows the gap is
    # sampling noise in the slope only. Over 50 seeds here the largest |gap| is below 0.02.
    gaps = []
    for seed in range(50):
        rng = np.random.default_rng([21, seed])
        draws = rng.choice(["tuned", "base", "tie"], size=(200, 2), p=[0.5, 0.2, 0.3])
        diff = rng.normal(0, 30, size=200)
        tvb = judge_summary(pairs({i: tuple(draws[i]) for i in range(200)}), lengths_frame(diff),
                            n_boot=0)["splits"]["valid"]["tuned_vs_base"]
        gaps.append(tvb["lc_win_rate"] - tvb["win_rate"])
    assert abs(float(np.mean(gaps))) < 0.005 and max(map(abs, gaps)) < 0.02


def test_lc_at_equal_length_says_it_extrapolates_when_every_tuned_answer_is_shorter():
    # The audit's run: every tuned answer 1 to 13 tokens shorter than its base answer. The rate at difference 0
    # lies outside the data.
    rng = np.random.default_rng(5)
    diff = -rng.integers(1, 14, size=40).astype(float)
    winner = np.where(rng.random(40) < 0.8, "tuned", "base")
    tvb = judge_summary(pairs({i: (w, w) for i, w in enumerate(winner)}), lengths_frame(diff),
                        n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert tvb["lc_extrapolated"] is True and "an extrapolation" in tvb["lc_reason"]
    assert tvb["length_diff"]["share_tuned_shorter"] == 1.0 and tvb["length_diff"]["max"] <= -1
    balanced = judge_summary(pairs({i: (w, w) for i, w in enumerate(winner)}), lengths_frame(diff * np.sign(
        rng.random(40) - 0.5)), n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert balanced["lc_extrapolated"] is False and "extrapolation" not in balanced["lc_reason"]


def test_lc_without_lengths_is_nan_with_a_reason():
    tvb = judge_summary(consistent_pairs({"tuned": 3, "base": 2}), n_boot=0)["splits"]["valid"]["tuned_vs_base"]
    assert math.isnan(tvb["lc_win_rate"]) and tvb["lc_reason"] == "no answer lengths given"


def test_splits_and_comparisons_are_summarised_apart():
    judgments = pl.concat([pairs({1: ("tuned", "tuned")}, split="train"),
                           pairs({1: ("base", "base"), 2: ("base", "base")}, split="valid"),
                           pairs({1: ("chosen", "chosen")}, comparison="chosen_vs_rejected", split="valid")])
    splits = judge_summary(judgments, n_boot=0)["splits"]
    assert splits["train"]["tuned_vs_base"]["win_rate"] == 1.0 and "chosen_vs_rejected" not in splits["train"]
    assert splits["valid"]["tuned_vs_base"]["win_rate"] == 0.0
    assert splits["valid"]["chosen_vs_rejected"]["agreement"] == 1.0


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.drop("verdict"), "lacks column"),
    (lambda df: df.with_columns(judge=pl.Series(["j", "k"] * 2)), "several judges"),
    (lambda df: df.with_columns(winner=pl.lit("base")), "does not follow from verdict"),
    (lambda df: df.with_columns(shown_first=pl.lit("chosen")), "does not follow from verdict"),
    (lambda df: pl.concat([df, df.head(1)]), "times"),
    (lambda df: df.with_columns(verdict=pl.lit("A")), "allowed"),
])
def test_contract_violations_raise_a_named_error(edit, message):
    with pytest.raises(DpoEvalError, match=message):
        judge_summary(edit(pairs({1: ("tuned", "tuned"), 2: ("base", "tie")})), n_boot=0)
