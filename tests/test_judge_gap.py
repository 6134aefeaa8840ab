"""The LLM judge's gap: tuned and base placed between rejected (0) and chosen (1) by a Bradley-Terry fit over the
four systems, from comparisons judged on a budgeted sample of prompts; the fit against a statsmodels GLM on the
same rows, and the whole path through `dpo-eval judge --gap-sample` against a scripted server whose verdicts
follow planted strengths."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import statsmodels.api as sm

from dpo_eval.studies.verdict import BT_SYSTEMS, bradley_terry, verdict
from tests.scripted_judge import ScriptedJudge

STRENGTH = {"Q0": 0.0, "Q1": 1.0, "Q2": 2.0, "Q3": 3.0}  # rejected, base, tuned, chosen: closed = 1/3 in truth


def glm_strengths(first, second, outcome) -> np.ndarray:
    x = np.zeros((len(first), 3))
    for i, (a, b) in enumerate(zip(first, second)):
        if a in BT_SYSTEMS:
            x[i, BT_SYSTEMS.index(a)] += 1
        if b in BT_SYSTEMS:
            x[i, BT_SYSTEMS.index(b)] -= 1
    y = np.asarray(outcome, dtype=float)
    X, Y, W = np.concatenate([x, x]), np.concatenate([np.ones_like(y), np.zeros_like(y)]), np.concatenate([y, 1 - y])
    keep = W > 0
    return sm.GLM(Y[keep], X[keep], family=sm.families.Binomial(), freq_weights=W[keep]).fit().params


def test_the_bradley_terry_fit_matches_a_statsmodels_glm():
    rng = np.random.default_rng(0)
    s = {"rejected": 0.0, "chosen": 1.5, "base": 0.4, "tuned": 0.9}
    pairs = [("chosen", "rejected"), ("tuned", "base"), ("tuned", "chosen"), ("base", "chosen")] * 80
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    p = np.array([1 / (1 + math.exp(-(s[a] - s[b]))) for a, b in pairs])
    outcome = np.where(rng.random(len(pairs)) < p, 1.0, 0.0)
    outcome[rng.random(len(pairs)) < 0.1] = 0.5
    assert bradley_terry(first, second, outcome) == pytest.approx(glm_strengths(first, second, outcome), abs=1e-5)


def coin(a: str, b: str) -> float:
    return int(hashlib.sha256("|".join(sorted([a, b])).encode()).hexdigest()[:8], 16) / 16**8


def strength_rule(a: str, b: str, user: str) -> str:
    """The answer holding the stronger Qn marker wins with the Bradley-Terry probability of the planted strengths
    (a fixed coin per pair of texts, the same in both orders)."""
    qa, qb = (next(w for w in t.split() if w in STRENGTH) for t in (a, b))
    x, y = sorted([(a, qa), (b, qb)])
    p_x = 1 / (1 + math.exp(-(STRENGTH[x[1]] - STRENGTH[y[1]])))
    winner = x[0] if coin(a, b) < p_x else y[0]
    return "[[A]]" if winner == a else "[[B]]"


def make_gap_run(folder: Path, n: int = 60) -> Path:
    folder.mkdir(parents=True)
    rows = [{"pair_id": f"p{i:02d}", "split": "valid" if i < 40 else "train", "system": "", "prompt": f"Question {i}?",
             "chosen": f"c{i} Q3 answer", "rejected": f"r{i} Q0 answer", "tuned": f"t{i} Q2 answer",
             "base": f"b{i} Q1 answer"} for i in range(n)]
    table = pl.DataFrame(rows)
    table.drop("tuned", "base").write_parquet(folder / "pairs.parquet")
    table.unpivot(index="pair_id", on=["tuned", "base"], variable_name="model", value_name="answer"
                  ).write_parquet(folder / "answers.parquet")
    (folder / "summary.json").write_text(json.dumps({"n_pairs": {"valid": 40, "train": 20}}))
    return folder


def test_gap_sample_judges_tuned_and_base_against_chosen_and_places_them(tmp_path):
    from tests.test_judge_scripted import judge_cli

    run = make_gap_run(tmp_path / "run")
    with ScriptedJudge(strength_rule) as server:
        summary = judge_cli(run, server, tmp_path / "cache", "--gap-sample", "30")
        calls = server.requests
    judgments = pl.read_parquet(run / "judgments.parquet")
    linked = judgments.filter(pl.col("comparison").is_in(["tuned_vs_chosen", "base_vs_chosen"]))
    assert linked["pair_id"].n_unique() == 30 and linked.height == 30 * 2 * 2
    assert set(linked["split"]) == {"valid"}  # held-out prompts first
    assert calls == judgments.height == 60 * 4 + 30 * 4
    block = summary["gap"]["LLM judge"]
    # the same fit by statsmodels on the judged rows of the split the verdict reads (valid)
    from dpo_eval.judges.statistics import ROLES, combine_orders

    rows = combine_orders(judgments.filter((pl.col("split") == "valid")
                                           & pl.col("pair_id").is_in(linked["pair_id"].unique().implode())))
    first = [ROLES[c][0] for c in rows["comparison"]]
    second = [ROLES[c][1] for c in rows["comparison"]]
    outcome = [1.0 if w == f else 0.5 if w == "tie" else 0.0 for w, f in zip(rows["winner"], first)]
    chosen, base, tuned = glm_strengths(first, second, outcome)
    assert block["base"] == pytest.approx(base / chosen, abs=1e-4)
    assert block["tuned"] == pytest.approx(tuned / chosen, abs=1e-4)
    assert block["closed"] == pytest.approx((tuned - base) / chosen, abs=1e-4)
    assert block["n"] == 30 and block["ci"][0] < block["closed"] < block["ci"][1]
    assert 0 < block["base"] < block["tuned"] < 1  # the planted order: rejected < base < tuned < chosen
    assert block["ci"][0] <= 1 / 3 <= block["ci"][1]  # the planted strengths close a third of the gap
    assert "on the LLM judge's scale, 30 valid prompts" in summary["verdict"]["gap_line"]
    assert verdict(run)[1]["LLM judge"]["closed"] == pytest.approx(block["closed"])


def test_no_finite_fit_is_said_never_a_number_or_a_traceback():
    """Ford's condition: where a system wins every comparison (or chosen beats rejected on every prompt) the
    strengths run off to infinity; the fit says so instead of returning the numbers where the optimiser stopped."""
    from dpo_eval.studies.verdict import bt_exists

    order = {"rejected": 0, "base": 1, "tuned": 2, "chosen": 3}
    pairs = [("chosen", "rejected"), ("tuned", "base"), ("tuned", "chosen"), ("base", "chosen")] * 10
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    perfect = np.array([1.0 if order[a] > order[b] else 0.0 for a, b in pairs])
    assert not bt_exists(first, second, perfect) and bradley_terry(first, second, perfect) is None
    assert bradley_terry(first, second, np.ones(len(pairs))) is None  # one outcome only: no traceback
    noisy = perfect.copy()
    noisy[[2, 3, 6, 7]] = 1 - noisy[[2, 3, 6, 7]]  # tuned loses to base once, beats chosen once, and so on
    noisy[[0]] = 0.5  # a tie between chosen and rejected links them both ways
    assert bt_exists(first, second, noisy) and bradley_terry(first, second, noisy) is not None


def test_a_judge_with_a_perfect_order_leaves_the_gap_undefined_through_the_cli(tmp_path):
    from tests.test_judge_scripted import judge_cli

    def ranked(a: str, b: str, user: str) -> str:
        qa, qb = (next(w for w in t.split() if w in STRENGTH) for t in (a, b))
        return "[[A]]" if STRENGTH[qa] > STRENGTH[qb] else "[[B]]"

    run = make_gap_run(tmp_path / "run", n=20)
    with ScriptedJudge(ranked) as server:
        summary = judge_cli(run, server, tmp_path / "cache", "--gap-sample", "10")
    block = summary["gap"]["LLM judge"]
    assert "closed" not in block and "no finite solution" in block["undefined"]
    assert "undefined" in summary["verdict"]["gap_line"]


def test_a_gap_sample_needs_both_comparisons():
    from pydantic import ValidationError

    from dpo_eval.config import JudgeSpec

    with pytest.raises(ValidationError, match="needs both comparisons"):
        JudgeSpec(model="m", comparisons=("tuned_vs_base",), gap_sample=5)
    assert JudgeSpec(model="m", gap_sample=5).gap_sample == 5
