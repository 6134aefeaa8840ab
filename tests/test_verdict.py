"""The four answers and the gap closed, on constructed runs whose right answer is known in advance: planted reward
scores (tuned better, an uncalibrated judge, a length-only preference), planted positions on the reward model's
scale, a planted forgetting table. Intervals are checked against statsmodels, kappa against statsmodels and
scikit-learn, and the gap's bootstrap CI by its coverage in a simulation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from statsmodels.stats.proportion import proportion_confint

from dpo_eval.config import VerdictSpec
from dpo_eval.studies.verdict import (
    cohen_kappa,
    gap,
    verdict,
    verdict_lines,
    write_verdict,
)

SPEC = VerdictSpec(resamples=1000)


def wilson(k: float, n: int) -> tuple[float, float]:
    return tuple(float(v) for v in proportion_confint(k, n, alpha=0.05, method="wilson"))


def reward_block(scores: dict[str, np.ndarray], split: str = "valid", in_sample: bool = False) -> dict:
    """summary.json's reward_model block written by hand from the planted scores (statsmodels' Wilson CIs)."""
    c, r, b, t = (scores[k] for k in ("chosen", "rejected", "base", "tuned"))
    n = c.size
    correct, ties = int((c > r).sum()), int((c == r).sum())
    wins, losses, win_ties = int((t > b).sum()), int((t < b).sum()), int((t == b).sum())
    low, high = wilson(correct, n)
    wlow, whigh = wilson(wins + win_ties / 2, n)
    return {"model": "planted", "splits": {split: {
        "accuracy": correct / n, "ci_low": low, "ci_high": high, "ties": ties, "n": n,
        "win_rate": (wins + win_ties / 2) / n, "win_ci_low": wlow, "win_ci_high": whigh, "p_value": 1.0,
        "wins": wins, "losses": losses, "win_ties": win_ties, "win_n": n, "in_sample": in_sample}}}


def write_run(folder: Path, scores: dict[str, np.ndarray], lengths: dict[str, np.ndarray] | None = None,
              summary: dict | None = None, prompts: list[str] | None = None, split: str = "valid") -> Path:
    """A run folder with pairs.parquet, features.parquet (n_tokens), reward_scores.parquet and summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    n = scores["chosen"].size
    ids = [f"p{i:03d}" for i in range(n)]
    prompts = prompts or [f"prompt {i}" for i in range(n)]
    pl.DataFrame({"pair_id": ids, "split": [split] * n, "system": [""] * n, "prompt": prompts,
                  "chosen": ["c"] * n, "rejected": ["r"] * n, "messages": [None] * n},
                 schema_overrides={"messages": pl.String}).write_parquet(folder / "pairs.parquet")
    lengths = lengths or {role: np.full(n, 10.0) for role in scores}
    rows = [{"pair_id": pid, "split": split, "role": role, "reward_model": float(scores[role][i]),
             "truncated": False, "n_tokens": int(lengths[role][i])}
            for role in ("chosen", "rejected", "base", "tuned") for i, pid in enumerate(ids)]
    table = pl.DataFrame(rows)
    table.write_parquet(folder / "reward_scores.parquet")
    table.select("pair_id", "split", "role", "n_tokens").write_parquet(folder / "features.parquet")
    base = {"n_pairs": {split: n}, "labels": {"source": "data set"}, "reward_model": reward_block(scores, split)}
    (folder / "summary.json").write_text(json.dumps(base | (summary or {})))
    return folder


def planted(n: int = 60, seed: int = 0, base: float = 0.3, tuned: float = 0.6) -> dict[str, np.ndarray]:
    """Scores on a scale where every pair shares one offset: rejected 0, chosen 1, base and tuned where planted."""
    offset = np.random.default_rng(seed).normal(0, 5, n)
    return {"rejected": offset, "chosen": offset + 1.0, "base": offset + base, "tuned": offset + tuned}


# ---------------------------------------------------------------- better and the gap

def test_planted_reward_scores_answer_better_yes_and_place_base_and_tuned_where_planted(tmp_path):
    scores = planted()
    rng = np.random.default_rng(1)
    lengths = {role: rng.integers(5, 40, scores["chosen"].size).astype(float) for role in scores}
    run = write_run(tmp_path / "run", scores, lengths)
    answers, gaps = verdict(run, SPEC)
    assert answers["better"]["answer"] == "yes", answers["better"]
    judge = answers["better"]["judges"][0]
    assert judge["calibrated"] and judge["win_rate"] == 1.0 and judge["lc_extrapolated"] is False
    block = gaps["reward model"]
    assert block["base"] == pytest.approx(0.3, abs=1e-12) and block["tuned"] == pytest.approx(0.6, abs=1e-12)
    assert block["closed"] == pytest.approx(0.3, abs=1e-12) and block["n"] == 60
    # every pair has the same positions: every resample gives 0.3 (up to rounding)
    assert block["ci"] == pytest.approx([0.3, 0.3], abs=1e-9)
    assert "DPO closed 30.0%" in answers["gap_line"] and "base at 0.30, tuned at 0.60" in answers["gap_line"]


def test_tuned_equal_to_base_closes_exactly_nothing(tmp_path):
    scores = planted(base=0.4, tuned=0.4)
    scores["tuned"] = scores["base"].copy()  # a zero adapter: the same answers, the same scores
    scores["chosen"] = scores["chosen"] + np.random.default_rng(3).normal(0, 0.1, 60)  # a noisy scale
    block = gap(scores, np.arange(60), 0.95, 500, 0)
    assert block["closed"] == 0.0 and block["ci"] == [0.0, 0.0]


def test_an_uncalibrated_judge_cannot_answer_better(tmp_path):
    rng = np.random.default_rng(2)
    n = 60
    chosen, rejected = rng.normal(0, 1, n), rng.normal(0, 1, n)  # chosen and rejected not told apart
    base = rng.normal(0, 1, n)
    run = write_run(tmp_path / "run", {"chosen": chosen, "rejected": rejected, "base": base, "tuned": base + 3.0})
    answers, gaps = verdict(run, SPEC)
    judge = answers["better"]["judges"][0]
    low, _ = wilson(int((chosen > rejected).sum()), n)
    assert low <= 0.5  # the construction: its agreement CI reaches 0.5
    assert not judge["calibrated"] and answers["better"]["answer"] == "unknown"
    assert "could not tell chosen from rejected" in answers["better"]["because"]
    assert "undefined" in gaps["reward model"]  # no scale on which to place tuned


def test_a_stricter_calibration_bar_turns_a_calibrated_judge_away(tmp_path):
    scores = planted(n=30)
    run = write_run(tmp_path / "run", scores, {r: np.random.default_rng(4).integers(5, 40, 30).astype(float)
                                              for r in scores})
    low, _ = wilson(30, 30)  # 30 of 30: lower bound about 0.886
    assert verdict(run, VerdictSpec(calibration_bar=low - 0.01, resamples=200))[0]["better"]["answer"] == "yes"
    assert verdict(run, VerdictSpec(calibration_bar=low + 0.01, resamples=200))[0]["better"]["answer"] == "unknown"


def test_a_length_only_preference_is_called_gaming(tmp_path):
    """The reward model scores length (plus a little noise); tuned answers are mostly longer than base: the raw win
    rate is high, the length-controlled rate is not, so the gain could be gaming."""
    rng = np.random.default_rng(5)
    n = 80
    lengths = {"chosen": rng.integers(30, 60, n).astype(float), "rejected": rng.integers(5, 25, n).astype(float),
               "base": rng.integers(10, 40, n).astype(float)}
    lengths["tuned"] = lengths["base"] + np.where(rng.random(n) < 0.75, rng.integers(5, 20, n), -rng.integers(1, 8, n))
    scores = {role: lengths[role] + rng.normal(0, 4.0, n) for role in lengths}
    run = write_run(tmp_path / "run", scores, lengths)
    answers, _ = verdict(run, SPEC)
    judge = answers["better"]["judges"][0]
    assert judge["calibrated"] and judge["ci"][0] > 0.5  # a raw win
    assert judge["lc_extrapolated"] is False and judge["lc_win_rate"] <= 0.5
    assert answers["better"]["answer"] == "unknown"
    assert answers["gaming"]["answer"] == "yes" and "length explains the win" in answers["gaming"]["because"]


def test_a_win_with_lengths_on_one_side_is_not_credited(tmp_path):
    """Every tuned answer longer than its base: the length-controlled rate would be an extrapolation, so neither
    'better' nor 'gaming' may rest on it."""
    scores = planted()
    lengths = {"chosen": np.full(60, 20.0), "rejected": np.full(60, 20.0), "base": np.full(60, 10.0),
               "tuned": 12.0 + np.arange(60) % 7}
    run = write_run(tmp_path / "run", scores, lengths)
    answers, _ = verdict(run, SPEC)
    assert answers["better"]["judges"][0]["lc_extrapolated"] is True
    assert answers["better"]["answer"] == "unknown" and answers["gaming"]["answer"] == "unknown"
    assert "extrapolation" in answers["gaming"]["because"]


def test_pairs_of_one_prompt_are_resampled_together(tmp_path):
    """Two pairs per prompt: the cluster bootstrap counts 30 prompts, and its CI is wider than one that (wrongly)
    treats the 60 pairs as independent."""
    rng = np.random.default_rng(6)
    effect = np.repeat(rng.normal(0.3, 0.3, 30), 2)  # a prompt's two pairs move together
    offset = rng.normal(0, 1, 60)
    scores = {"rejected": offset, "chosen": offset + 1.0, "base": offset, "tuned": offset + effect}
    run = write_run(tmp_path / "run", scores, prompts=[f"prompt {i // 2}" for i in range(60)])
    block = verdict(run, VerdictSpec(resamples=2000))[1]["reward model"]
    independent = gap(scores, np.arange(60), 0.95, 2000, 0)
    assert block["prompts"] == 30 and block["n"] == 60
    assert block["closed"] == pytest.approx(independent["closed"])
    assert block["ci"][1] - block["ci"][0] > 1.2 * (independent["ci"][1] - independent["ci"][0])


def test_the_gap_ci_covers_the_truth_at_its_level():
    """600 simulated runs of 40 prompts (chosen - rejected ~ N(1, 0.5), tuned - base ~ N(0.25, 0.6), so the
    population's closed share is 0.25): the 90% percentile CI covers 0.25 in 0.85-0.95 of them (binomial sd
    0.012 at 600 runs; a percentile bootstrap of a ratio at n = 40 runs a little under its level)."""
    rng = np.random.default_rng(7)
    covered, runs, n = 0, 600, 40
    for i in range(runs):
        rejected = rng.normal(0, 1, n)
        chosen = rejected + rng.normal(1.0, 0.5, n)
        base = rejected + rng.normal(0.2, 0.5, n)
        tuned = base + rng.normal(0.25, 0.6, n)
        block = gap({"chosen": chosen, "rejected": rejected, "base": base, "tuned": tuned}, np.arange(n), 0.90,
                    400, i)
        covered += block["ci"][0] <= 0.25 <= block["ci"][1]
    assert 0.85 <= covered / runs <= 0.95, covered / runs


# ---------------------------------------------------------------- alignment

@pytest.mark.parametrize("correct, n, ties, expected", [(20, 21, 0, "yes"), (3, 21, 0, "no"), (12, 21, 0, "unknown"),
                                                        (0, 21, 21, "no")])
def test_alignment_from_the_held_out_implicit_reward_accuracy(tmp_path, correct, n, ties, expected):
    low, high = wilson(correct, n)
    assert (low > 0.5) == (expected == "yes") or ties == n  # the construction agrees with statsmodels' interval
    summary = {"n_pairs": {"valid": n}, "labels": {"source": "data set"},
               "implicit_reward": {"valid": {"accuracy": correct / n, "n": n, "ties": ties}},
               "significant": {"tuned_vs_base": {"valid": 5}}, "significant_toward_chosen": {"valid": 4}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    answer = verdict(tmp_path, SPEC)[0]["alignment"]
    assert answer["answer"] == expected, answer
    assert answer.get("ci", [low, high]) == pytest.approx([low, high])
    assert "4 of the 5 features" in answer["because"]


def test_alignment_is_unknown_without_a_held_out_split_or_labels(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"n_pairs": {"train": 40}, "labels": {"source": "data set"}}))
    assert verdict(tmp_path, SPEC)[0]["alignment"]["answer"] == "unknown"
    (tmp_path / "summary.json").write_text(json.dumps({"n_pairs": {"valid": 4}, "labels": {"source": "none"}}))
    answers = verdict(tmp_path, SPEC)[0]
    assert answers["alignment"]["answer"] == "unknown"
    assert answers["better"]["answer"] == "not checked" and answers["forgetting"]["answer"] == "not checked"



def test_a_judge_without_calibration_on_a_set_without_labels_says_why_it_cannot_answer(tmp_path):
    block = {"tuned_vs_base": {"n": 10, "wins": 7, "losses": 3, "ties": 0, "win_rate": 0.7}}
    (tmp_path / "summary.json").write_text(json.dumps({"n_pairs": {"valid": 10}, "labels": {"source": "none"},
                                                      "judge": {"splits": {"valid": block}}}))
    answer = verdict(tmp_path, SPEC)[0]["better"]
    assert answer["answer"] == "unknown" and "no calibration" in answer["because"], answer
    assert "--reference-dataset" in answer["because"]


# ---------------------------------------------------------------- forgetting

def forgetting_summary(rows: dict[str, tuple[int, int, int, int]]) -> dict:
    """summary.json's forgetting block from per-task (both, tuned_only, base_only, neither) counts, through the
    harness's own summary (the statistics it reports are tested against statsmodels in test_forgetting.py)."""
    from dpo_eval.forgetting.harness import summarize

    frames = []
    for task, (both, tuned_only, base_only, neither) in rows.items():
        base = [1] * both + [0] * tuned_only + [1] * base_only + [0] * neither
        tuned = [1] * both + [1] * tuned_only + [0] * base_only + [0] * neither
        frames.append(pl.DataFrame({"task": task, "metric": "acc", "doc_id": list(range(len(base))),
                                    "base": base, "tuned": tuned}))
    return {"forgetting": {"tasks": summarize(pl.concat(frames))}}


def test_forgetting_names_the_planted_task_only(tmp_path):
    summary = forgetting_summary({"arc": (60, 2, 30, 8), "piqa": (70, 5, 6, 19), "boolq": (50, 10, 9, 31)})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    answer = verdict(tmp_path, SPEC)[0]["forgetting"]
    assert answer["answer"] == "yes" and answer["tasks"] == ["arc"]


def test_no_forgetting_states_the_smallest_detectable_drop(tmp_path):
    summary = forgetting_summary({"piqa": (70, 5, 6, 19), "boolq": (50, 10, 9, 31)})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    answer = verdict(tmp_path, SPEC)[0]["forgetting"]
    assert answer["answer"] == "no" and "could go unseen on" in answer["because"]
    tasks = summary["forgetting"]["tasks"]
    assert answer["detectable"] == pytest.approx({t: m["acc"]["delta"] - m["acc"]["ci_low"] for t, m in tasks.items()})


# ---------------------------------------------------------------- the judges' agreement

def test_cohen_kappa_matches_statsmodels_and_scikit_learn():
    from sklearn.metrics import cohen_kappa_score
    from statsmodels.stats.inter_rater import cohens_kappa

    rng = np.random.default_rng(8)
    a = rng.choice(["tuned", "base", "tie"], 200, p=[0.5, 0.4, 0.1]).tolist()
    b = [x if rng.random() < 0.6 else rng.choice(["tuned", "base", "tie"]) for x in a]
    labels = ["base", "tie", "tuned"]
    table = np.array([[sum(1 for x, y in zip(a, b) if x == i and y == j) for j in labels] for i in labels])
    assert cohen_kappa(a, b) == pytest.approx(cohens_kappa(table).kappa, abs=1e-12)
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
    assert math.isnan(cohen_kappa([], []))


# ---------------------------------------------------------------- written, read, printed

def test_write_verdict_stores_both_blocks_renders_them_first_and_prints_four_lines(tmp_path):
    run = write_run(tmp_path / "run", planted(), {r: np.random.default_rng(9).integers(5, 40, 60).astype(float)
                                                  for r in ("chosen", "rejected", "base", "tuned")})
    summary = write_verdict(run, SPEC)
    stored = json.loads((run / "summary.json").read_text())
    assert set(stored["verdict"]) >= {"alignment", "better", "forgetting", "gaming"} and "reward model" in stored["gap"]
    for answer in (stored["verdict"][q] for q in ("alignment", "better", "forgetting", "gaming")):
        assert answer["answer"] in ("yes", "no", "unknown", "not checked") and answer["rule"] and answer["because"]
    lines = verdict_lines(summary)
    assert [line.split("?")[0] for line in lines[:4]] == ["Did the alignment take", "Is the tuned model better than "
                                                          "its base", "Did it forget", "Could the gain be gaming"]
    assert lines[4].startswith("DPO closed 30.0%")
    page = (run / "report.html").read_text()
    assert 'data-question="better" data-answer="yes"' in page and 'data-closed="0.3' in page


# ---------------------------------------------------------------- the checkpoint to ship

def trend_table(rows: list[tuple]) -> pl.DataFrame:
    """A trend table of (step, alignment, forgetting, win_rate, win_low, win_high, largest_drop) rows."""
    from dpo_eval.studies.trend import SCHEMA

    full = [{"run": f"runs/c{step}", "adapter": f"train/checkpoint-{step}", "step": step, "alignment": al,
             "forgetting": fo, "win_judge": "reward model", "win_rate": w, "win_low": lo, "win_high": hi,
             "largest_drop": drop} for step, al, fo, w, lo, hi, drop in rows]
    return pl.DataFrame(full, schema_overrides={k: v for k, v in SCHEMA.items() if k in full[0]})


def test_the_recommendation_follows_its_stated_rule():
    from dpo_eval.studies.trend import recommend

    table = trend_table([(10, "unknown", "no", 0.80, 0.70, 0.88, 0.01),   # alignment not shown: out
                         (20, "yes", "no", 0.62, 0.52, 0.71, 0.01),       # CI overlaps the best's: earliest in
                         (30, "yes", "no", 0.70, 0.61, 0.78, 0.02),       # the best qualifying win rate
                         (40, "yes", "yes", 0.90, 0.84, 0.95, 0.12)])     # forgot: out
    earliest = recommend(table, "earliest-within-ci")
    assert earliest["checkpoint"] == "checkpoint-20" and earliest["step"] == 20
    assert "0.70 [0.61, 0.78] at step 30" in earliest["because"] and "2 of 4 checkpoints qualify" in earliest["because"]
    assert recommend(table, "best")["checkpoint"] == "checkpoint-30"
    table = trend_table([(20, "yes", "no", 0.50, 0.40, 0.60, None), (30, "yes", "no", 0.90, 0.81, 0.95, None)])
    assert recommend(table)["checkpoint"] == "checkpoint-30"  # 0.60 < 0.81: step 20 is shown worse
    none = recommend(trend_table([(20, "no", "no", 0.9, 0.8, 0.95, None)]))
    assert none["checkpoint"] is None and "alignment took" in none["because"]


# ---------------------------------------------------------------- two judges that disagree

def judgments_of(winners: dict[str, list[str]], split: str = "valid") -> pl.DataFrame:
    """Both orders of each pair's planted winner: {comparison: [winner per pair p000, p001, ...]}."""
    from dpo_eval.judges.statistics import ROLES

    rows = []
    for comparison, names in winners.items():
        a, b = ROLES[comparison]
        for i, winner in enumerate(names):
            for order, first in (("ab", a), ("ba", b)):
                verdict = "tie" if winner == "tie" else "first" if winner == first else "second"
                rows.append({"pair_id": f"p{i:03d}", "split": split, "comparison": comparison, "judge": "planted-llm",
                             "order": order, "shown_first": first, "verdict": verdict, "winner": winner})
    return pl.DataFrame(rows)


def test_judges_that_agree_no_better_than_chance_beside_a_win_are_a_gaming_signal(tmp_path):
    """The reward model prefers tuned on every pair (by 0.3 + i/1000); the LLM judge names tuned or base at random:
    the reward model's verdict is constant, so Cohen's kappa is exactly 0, below the bar."""
    from dpo_eval.judges.statistics import judge_summary

    n = 60
    scores = planted(n=n)
    scores["tuned"] = scores["base"] + 0.3 + np.arange(n) / 1000
    lengths = {r: np.random.default_rng(10).integers(5, 40, n).astype(float) for r in scores}
    run = write_run(tmp_path / "run", scores, lengths,
                    prompts=[f"prompt {i}" for i in range(n)])
    pl.DataFrame({"pair_id": [f"p{i:03d}" for i in range(n) for _ in range(2)],
                  "model": ["base", "tuned"] * n,
                  "answer": [f"{m} answer {i}" for i in range(n) for m in ("base", "tuned")]}).write_parquet(
        run / "answers.parquet")
    llm = np.random.default_rng(11).choice(["tuned", "base"], n).tolist()
    judgments = judgments_of({"tuned_vs_base": llm, "chosen_vs_rejected": ["chosen"] * n})
    judgments.write_parquet(run / "judgments.parquet")
    summary = json.loads((run / "summary.json").read_text())
    summary["judge"] = judge_summary(judgments)
    (run / "summary.json").write_text(json.dumps(summary))

    written = write_verdict(run, SPEC)
    gaming = written["verdict"]["gaming"]
    agreement = gaming["judge_agreement"]
    assert agreement["n"] == n and agreement["kappa"] == 0.0
    assert agreement["agree"] == pytest.approx(llm.count("tuned") / n)
    assert gaming["answer"] == "yes" and "Cohen's kappa 0.00" in gaming["because"]
    better = written["verdict"]["better"]
    assert [j["judge"] for j in better["judges"]] == ["reward model", "LLM judge"]
    assert better["judges"][0]["answer"] == "yes" and better["judges"][1]["answer"] == "unknown"
    section = next(s for s in json.loads((run / "report_sections.json").read_text()) if s["id"] == "gaming")
    disagree = [i for i, w in enumerate(llm) if w == "base"]
    shown = sorted(disagree, reverse=True)[:10]  # the largest reward margins first
    assert [row[3] for row in section["rows"]] == [f"base answer {i}" for i in shown]
    assert [row[4] for row in section["rows"]] == [f"tuned answer {i}" for i in shown]
    assert all(row[5].startswith("tuned (+0.3") and row[6] == "base" for row in section["rows"])
    assert f"on {len(disagree)} of {n} prompts" in section["paragraphs"][0]


# ---------------------------------------------------------------- review findings, each a constructed case

def test_a_prompt_with_several_pairs_counts_once_in_the_win_rate(tmp_path):
    """10 prompts x 4 pairs, tuned scored above base on 8 prompts: the reward model's win rate counts 10 prompts
    (Wilson 8/10 reaches 0.49: unknown), not 40 copies of them (whose CI would lie above 0.5)."""
    from dpo_eval.judges.reward_model import calibration

    n = 40
    scores = planted(n=n)
    wins = np.array([i // 4 < 8 for i in range(n)])  # prompts 0-7 win, 8-9 lose
    scores["tuned"] = scores["base"] + np.where(wins, 0.2, -0.2)
    prompts = [f"prompt {i // 4}" for i in range(n)]
    lengths = {r: np.tile(np.random.default_rng(13).integers(5, 40, 10).astype(float), 4)[np.argsort(
        np.arange(n) % 10, kind="stable")] for r in scores}
    run = write_run(tmp_path / "run", scores, lengths, prompts=prompts)
    from dpo_eval.data.pairs import prompt_ids

    pairs = pl.read_parquet(run / "pairs.parquet")
    features = (pl.read_parquet(run / "reward_scores.parquet").select("pair_id", "split", "role", "reward_model")
                .join(pairs.select("pair_id", prompt_id=pl.Series(prompt_ids(pairs))), on="pair_id"))
    block = calibration(features)["valid"]
    assert (block["win_n"], block["wins"], block["losses"]) == (10, 8, 2) and block["n"] == n
    assert [block["win_ci_low"], block["win_ci_high"]] == pytest.approx(list(wilson(8, 10)))
    summary = json.loads((run / "summary.json").read_text())
    summary["reward_model"]["splits"]["valid"] |= {k: block[k] for k in ("win_rate", "win_ci_low", "win_ci_high",
                                                                       "wins", "losses", "win_ties", "win_n")}
    (run / "summary.json").write_text(json.dumps(summary))
    judge = verdict(run, SPEC)[0]["better"]["judges"][0]
    assert judge["n"] == 10 and judge["ci"][0] == pytest.approx(wilson(8, 10)[0]) and judge["answer"] == "unknown"


def test_the_intervals_are_taken_at_the_verdicts_own_level(tmp_path):
    """39 of 60 prompts won: at 95% the Wilson CI lies above 0.5, at 99% it reaches below 0.5 (statsmodels)."""
    scores = planted(n=60)
    scores["tuned"] = scores["base"] + np.where(np.arange(60) < 39, 0.2, -0.2)
    run = write_run(tmp_path / "run", scores, {r: np.random.default_rng(14).integers(5, 40, 60).astype(float)
                                              for r in scores})
    at95 = verdict(run, VerdictSpec(resamples=200))[0]["better"]["judges"][0]
    at99 = verdict(run, VerdictSpec(alpha=0.01, resamples=200))[0]["better"]["judges"][0]
    low99, _ = proportion_confint(39, 60, alpha=0.01, method="wilson")
    assert at95["ci"][0] == pytest.approx(wilson(39, 60)[0]) and at95["ci"][0] > 0.5
    assert at99["ci"][0] == pytest.approx(low99) and at99["ci"][0] <= 0.5 and at99["answer"] == "unknown"


def test_judges_that_mostly_agree_are_no_gaming_signal_and_an_uncalibrated_win_is_no_gain(tmp_path):
    from dpo_eval.judges.statistics import judge_summary

    n = 60
    scores = planted(n=n)
    scores["tuned"] = scores["base"] + 0.3
    lengths = {r: np.random.default_rng(15).integers(5, 40, n).astype(float) for r in scores}
    run = write_run(tmp_path / "run", scores, lengths)
    llm = ["tuned"] * 57 + ["base"] * 3  # agrees with the reward model on 95% of prompts; kappa is 0 all the same
    judgments = judgments_of({"tuned_vs_base": llm, "chosen_vs_rejected": ["chosen"] * n})
    judgments.write_parquet(run / "judgments.parquet")
    summary = json.loads((run / "summary.json").read_text()) | {"judge": judge_summary(judgments)}
    (run / "summary.json").write_text(json.dumps(summary))
    answers = verdict(run, SPEC)[0]
    agreement = answers["gaming"]["judge_agreement"]
    assert agreement["kappa"] == 0.0 and agreement["agree"] == pytest.approx(0.95)
    assert answers["gaming"]["answer"] != "yes" and answers["better"]["answer"] == "yes"
    # the same scores from a reward model that cannot tell chosen from rejected: its win explains nothing
    rng = np.random.default_rng(16)
    scores = {"chosen": rng.normal(0, 1, n), "rejected": rng.normal(0, 1, n), "base": rng.normal(0, 1, n)}
    scores["tuned"] = scores["base"] + 1.0
    run = write_run(tmp_path / "uncalibrated", scores, {r: rng.integers(5, 40, n).astype(float) for r in scores})
    answers = verdict(run, SPEC)[0]
    assert not answers["better"]["judges"][0]["calibrated"] and answers["gaming"]["answer"] == "no"
    assert "no calibrated judge" in answers["gaming"]["because"]


def test_a_benchmark_task_that_did_not_run_leaves_forgetting_unknown(tmp_path):
    summary = forgetting_summary({"piqa": (70, 5, 6, 19)})
    summary["forgetting"]["failed"] = {"arc_easy": "could not load its data"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    answer = verdict(tmp_path, SPEC)[0]["forgetting"]
    assert answer["answer"] == "unknown" and "arc_easy" in answer["because"]


def test_write_verdict_names_a_folder_that_is_not_a_run(tmp_path):
    from dpo_eval.errors import DpoEvalError

    with pytest.raises(DpoEvalError, match="no summary.json"):
        write_verdict(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_a_prompt_counts_by_its_scored_pair_whichever_pair_that_is():
    """--limit scores the first pairs in table order; a prompt whose scored pair is not its smallest pair_id still
    counts once in the reward model's win rate."""
    from dpo_eval.judges.reward_model import calibration

    rows = []
    for prompt, (scored, unscored) in enumerate([("p9", "p0"), ("p8", "p1")]):
        for pid, value in ((scored, 1.0), (unscored, None)):
            for role, base in (("chosen", 2.0), ("rejected", 0.0), ("base", 0.5), ("tuned", 0.5)):
                score = None if value is None else base + (0.3 if role == "tuned" else 0.0)
                rows.append({"pair_id": pid, "split": "valid", "role": role, "reward_model": score,
                             "prompt_id": f"q{prompt}"})
    block = calibration(pl.DataFrame(rows))["valid"]
    assert block["win_n"] == 2 and block["wins"] == 2


def test_unscored_answers_and_null_figures_are_missing_not_a_traceback_or_a_win(tmp_path):
    """A NaN reward score is no score: it is neither a win nor in the gap; a split with no tuned score gives no
    length control, and null figures in summary.json (an older or hand-edited file) read as missing."""
    from dpo_eval.studies.verdict import reward_outcomes

    scores = pl.DataFrame({"pair_id": ["a", "a", "b", "b"], "split": ["valid"] * 4,
                           "role": ["tuned", "base", "tuned", "base"], "reward_model": [float("nan"), 1.0, 2.0, 1.0]})
    assert reward_outcomes(scores, "valid").rows() == [("b", "valid", "tuned")]
    assert reward_outcomes(scores.filter(pl.col("role") == "base"), "valid").height == 0
    n = 30
    planted_scores = planted(n=n)
    planted_scores["tuned"][0] = float("nan")
    run = write_run(tmp_path / "run", planted_scores, {r: np.full(n, 10.0) for r in planted_scores})
    gap_block = verdict(run, SPEC)[1]["reward model"]
    assert gap_block["n"] == n - 1 and gap_block["closed"] == pytest.approx(0.3, abs=1e-12)
    summary = json.loads((run / "summary.json").read_text())
    summary["reward_model"]["splits"]["valid"] |= {"accuracy": None, "wins": None}
    summary |= {"implicit_reward": {"valid": {"accuracy": None, "n": 5, "ties": None}}}
    (run / "summary.json").write_text(json.dumps(summary))
    answers = verdict(run, SPEC)[0]
    assert answers["alignment"]["answer"] == "unknown" and answers["better"]["answer"] == "unknown"
