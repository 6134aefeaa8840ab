"""The style-controlled win rate: markdown counts on planted texts, the fit against a statsmodels GLM on the same
rows, a judge that only likes list items (its raw win disappears under style control), and the whole path through
`dpo-eval judge` against a scripted server whose rule is that preference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm

from dpo_eval.judges.style import (
    COVARIATES,
    sc_win_rate,
    style_counts,
    style_differences,
)
from tests.scripted_judge import ScriptedJudge


def test_markdown_counts_of_a_planted_answer():
    text = ("# Title\nSome **bold** text and __more__.\n## Part\n- one\n- two\n* three\n1. first\n2) second\n"
            "not a # header, not -a list, not ** bold **\n   ### indented header\n")
    assert style_counts(text) == {"headers": 3, "lists": 5, "bold": 2}
    assert style_counts(None) == {"headers": 0, "lists": 0, "bold": 0}


def test_differences_are_normalised_by_the_pairs_sum():
    styles = pl.DataFrame({"pair_id": ["a", "a", "b", "b"], "split": ["valid"] * 4, "role": ["tuned", "base"] * 2,
                           "length": [30.0, 10.0, 5.0, 5.0], "headers": [0, 0, 2, 0], "lists": [3, 1, 0, 4],
                           "bold": [1, 1, 0, 0]})
    d = style_differences(styles).sort("pair_id")
    assert d.row(0, named=True) == {"pair_id": "a", "split": "valid", "length": 0.5, "headers": 0.0, "lists": 0.5,
                                    "bold": 0.0}
    assert d.row(1, named=True) == {"pair_id": "b", "split": "valid", "length": 0.0, "headers": 1.0, "lists": -1.0,
                                    "bold": 0.0}


def planted_verdicts(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes (1, 0, and 1/2 for ties) from a known logistic model of four style differences."""
    rng = np.random.default_rng(seed)
    d = np.column_stack([rng.uniform(-0.6, 0.8, n), rng.choice([-1.0, 0.0, 1.0], n, p=[0.2, 0.5, 0.3]),
                         rng.uniform(-1, 1, n), rng.choice([0.0, 0.5, 1.0], n)])
    p = 1 / (1 + np.exp(-(0.2 + d @ np.array([1.0, 0.3, 0.8, -0.2]))))
    u = rng.random(n)
    y = np.where(u < p, 1.0, 0.0)
    y[rng.random(n) < 0.1] = 0.5  # some ties
    return y, d


def test_the_fit_matches_a_statsmodels_glm_on_the_same_rows():
    y, d = planted_verdicts()
    block = sc_win_rate(y, d, resamples=200, seed=1)
    x = d / d.std(axis=0)  # scaled, not centred
    X = sm.add_constant(np.concatenate([x, x]))
    Y = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    W = np.concatenate([y, 1 - y])
    keep = W > 0
    glm = sm.GLM(Y[keep], X[keep], family=sm.families.Binomial(), freq_weights=W[keep]).fit()
    assert block["sc_win_rate"] == pytest.approx(1 / (1 + np.exp(-glm.params[0])), abs=1e-5)
    for name, reference in zip(COVARIATES, glm.params[1:]):
        assert block["sc_coefficients"][name] == pytest.approx(reference, abs=1e-4), name
    assert block["sc_ci_low"] < block["sc_win_rate"] < block["sc_ci_high"] and block["sc_n"] == y.size
    assert block["sc_extrapolated"] is False and block["sc_left_out"] == []


def test_a_covariate_without_variation_is_left_out_and_one_sided_differences_are_flagged():
    y, d = planted_verdicts(seed=2)
    d[:, 1] = 0.0  # no headers anywhere
    block = sc_win_rate(y, d, resamples=100)
    assert block["sc_left_out"] == ["headers"] and set(block["sc_coefficients"]) == {"length", "lists", "bold"}
    d[:, 0] = np.abs(d[:, 0]) + 0.01  # tuned always longer: equal length lies outside the data
    block = sc_win_rate(y, d, resamples=100)
    assert block["sc_extrapolated"] is True and "extrapolation" in block["sc_reason"] and "length" in block["sc_reason"]


def coin(a: str, b: str, salt: str) -> float:
    """A position-blind pseudo-random number in [0, 1) of the two answers (both orders give the same)."""
    return int(hashlib.sha256((salt + "|".join(sorted([a, b]))).encode()).hexdigest()[:8], 16) / 16**8


def lists_rule(a: str, b: str, user: str) -> str:
    """The answer with more list items wins 85% of the time (a fixed coin per pair); equal counts: a fair coin."""
    la, lb = style_counts(a)["lists"], style_counts(b)["lists"]
    u = coin(a, b, "lists")
    if la == lb:
        better = a if coin(a, b, "tie") < 0.5 else b
    else:
        more, fewer = (a, b) if la > lb else (b, a)
        better = more if u < 0.85 else fewer
    return "[[A]]" if better == a else "[[B]]"


def make_styled_run(folder: Path, n: int = 60) -> Path:
    """A run whose tuned answers carry list items on 45 of 60 pairs (base on 5), lengths on both sides."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        words = int(rng.integers(6, 20))
        tuned_lists = int(rng.integers(1, 4)) if i < 45 else 0
        base_lists = 2 if 45 <= i < 50 else 0
        tuned = f"t{i} " + "word " * words + "".join(f"\n- item {k}" for k in range(tuned_lists))
        base = f"b{i} " + "word " * int(rng.integers(6, 20)) + "".join(f"\n- point {k}" for k in range(base_lists))
        rows.append({"pair_id": f"p{i:02d}", "split": "valid", "system": "", "prompt": f"Question {i}?",
                     "chosen": f"c{i} good", "rejected": f"r{i} bad", "tuned": tuned, "base": base})
    from tests.test_judge_scripted import write_tables

    return write_tables(folder, pl.DataFrame(rows))


def test_a_judge_that_likes_lists_wins_raw_but_not_under_style_control(tmp_path):
    """Through `dpo-eval judge` against the scripted server: the raw win rate lies above 0.5 (tuned has the lists),
    the style-controlled rate does not, the lists coefficient is the largest and positive, and the report and the
    four answers say so."""
    from tests.test_judge_scripted import judge_cli

    run = make_styled_run(tmp_path / "run")
    with ScriptedJudge(lists_rule) as server:
        summary = judge_cli(run, server, tmp_path / "cache", "--comparisons", "tuned_vs_base")
    tb = summary["judge"]["splits"]["valid"]["tuned_vs_base"]
    assert tb["n"] == 60 and tb["ci_low"] > 0.5, tb
    assert tb["sc_ci_low"] <= 0.5 <= tb["sc_ci_high"] and tb["sc_win_rate"] < tb["win_rate"] - 0.1
    coefficients = tb["sc_coefficients"]
    assert coefficients["lists"] > 0.5 and coefficients["lists"] == max(coefficients.values())
    assert tb["sc_extrapolated"] is False and "headers" in tb["sc_left_out"]  # no answer has a header
    page = (run / "report.html").read_text()
    assert "SC win rate" in page and "list items" in page


def test_the_four_answers_read_the_style_control(tmp_path):
    """The list-loving judge, calibrated on planted labels (chosen holds a list, rejected none): 'better' cannot be
    yes when the style-controlled rate does not back the raw one, and 'gaming' names the style."""
    from dpo_eval.studies.verdict import verdict
    from tests.test_judge_scripted import judge_cli

    run = make_styled_run(tmp_path / "run")
    pairs = pl.read_parquet(run / "pairs.parquet").with_columns(
        chosen=pl.col("chosen") + "\n- a list item", rejected=pl.col("rejected"))
    pairs.write_parquet(run / "pairs.parquet")
    with ScriptedJudge(lists_rule) as server:
        summary = judge_cli(run, server, tmp_path / "cache")
    answers = verdict(run)[0]
    judge = next(j for j in answers["better"]["judges"] if j["judge"] == "LLM judge")
    assert judge["calibrated"] and judge["ci"][0] > 0.5 and judge["sc_win_rate"] <= 0.5
    assert judge["answer"] == "unknown" and answers["better"]["answer"] == "unknown"
    assert answers["gaming"]["answer"] == "yes" and "style-controlled rate" in answers["gaming"]["because"]
    assert summary["verdict"]["gaming"]["answer"] == "yes"  # written by `dpo-eval judge` itself


def test_a_covariate_that_decides_every_verdict_gives_no_rate():
    rng = np.random.default_rng(4)
    d = np.column_stack([rng.uniform(-1, 1, 80), np.zeros(80), rng.choice([-1.0, 1.0], 80), np.zeros(80)])
    y = np.where(d[:, 2] > 0, 1.0, 0.0)  # list items alone decide: complete separation
    block = sc_win_rate(y, d, resamples=50)
    assert np.isnan(block["sc_win_rate"]) and block["sc_reason"].startswith("separation")


def test_the_bootstrap_interval_equals_one_statsmodels_fit_per_resample():
    """The resamples are fitted together (Newton's method on draw counts): the percentile bounds must equal those of
    one GLM per resample drawn the same way (rng.integers over pairs, resample after resample)."""
    y, d = planted_verdicts(n=80, seed=3)
    resamples, seed, level = 60, 7, 0.9
    block = sc_win_rate(y, d, resamples=resamples, seed=seed, level=level)
    x = d / d.std(axis=0)
    rng = np.random.default_rng(seed)
    rates = []
    for _ in range(resamples):
        pick = rng.integers(0, y.size, y.size)
        yb, xb = y[pick], x[pick]
        X = sm.add_constant(np.concatenate([xb, xb]), has_constant="add")
        W = np.concatenate([yb, 1 - yb])
        keep = W > 0
        fit = sm.GLM(np.concatenate([np.ones_like(yb), np.zeros_like(yb)])[keep], X[keep],
                     family=sm.families.Binomial(), freq_weights=W[keep]).fit()
        rates.append(1 / (1 + np.exp(-fit.params[0])))
    low, high = np.quantile(rates, [(1 - level) / 2, 1 - (1 - level) / 2])
    assert block["sc_ci_low"] == pytest.approx(low, abs=1e-5) and block["sc_ci_high"] == pytest.approx(high, abs=1e-5)
