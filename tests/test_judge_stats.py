"""Judge statistics against cases whose answer is known in advance: hand-made verdicts, counts checked
against scipy, planted rates and planted length or quality preferences."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.statistics import (bootstrap_ci, combine_orders, judge_rng, judge_summary, lc_win_rate,
                                  position_consistency)

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
    assert (tvb["ties"], tvb["win_rate"], tvb["ci_low"], tvb["ci_high"]) == (40, 0.5, 0.5, 0.5)
    assert math.isnan(tvb["p_value"])  # no decided pair


def test_chosen_vs_rejected_agreement_counts_ties_half():
    judgments = consistent_pairs({"chosen": 6, "rejected": 2, "tie": 2}, comparison="chosen_vs_rejected")
    cvr = judge_summary(judgments, n_boot=500)["splits"]["valid"]["chosen_vs_rejected"]
    assert CONTRACT["chosen_vs_rejected"] <= set(cvr)
    assert (cvr["n"], cvr["agreement"], cvr["position_consistency"]) == (10, 0.7, 1.0)
    assert cvr["ci_low"] < 0.7 < cvr["ci_high"]


def test_bootstrap_ci_covers_a_planted_rate():
    # planted win rate: P(win) + P(tie)/2 = 0.5 + 0.2/2 = 0.6. A 95% percentile CI over 200 pairs should
    # cover it in about 95 of 100 replications; >= 90 leaves room for the percentile method's slight
    # undercoverage and for binomial noise (sd of the count about 2.2).
    planted, covered = 0.6, 0
    for rep in range(100):
        scores = np.random.default_rng([7, rep]).choice([1.0, 0.5, 0.0], size=200, p=[0.5, 0.2, 0.3])
        low, high = bootstrap_ci(scores, 1000, 0.05, judge_rng(rep, "valid", "tuned_vs_base"))
        covered += low <= planted <= high
    assert covered >= 90


def test_bootstrap_is_seeded_per_split_and_comparison():
    scores = np.random.default_rng(1).random(50)  # continuous, so two streams cannot share quantiles by chance
    ci = lambda seed, comparison: bootstrap_ci(scores, 300, 0.05, judge_rng(seed, "valid", comparison))  # noqa: E731
    assert ci(3, "tuned_vs_base") == ci(3, "tuned_vs_base")
    assert ci(3, "tuned_vs_base") != ci(4, "tuned_vs_base")
    assert ci(3, "tuned_vs_base") != ci(3, "chosen_vs_rejected")
    assert all(map(math.isnan, bootstrap_ci(scores, 0, 0.05, judge_rng(3, "valid", "x"))))


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
    ([1, 1, 1, 1], [1, 2, 3, 4], "every valid verdict is a win"),
    ([0, 0, 0.0], [1, 2, 3], "every valid verdict is a loss"),
    ([1, 0, 0.5, 1], [5, 5, 5, 5], "no length variation"),
    ([1, 1, 0, 0], [3, 2, -1, -2], "complete separation"),
    ([1, 0], [np.nan, np.nan], "no valid tuned-vs-base verdict"),
    ([], [], "no valid tuned-vs-base verdict"),
])
def test_lc_degenerate_cases_give_nan_and_a_reason(outcome, diff, reason):
    rate, why = lc_win_rate(np.array(outcome, float), np.array(diff, float))
    assert math.isnan(rate) and reason in why


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
