"""The four answers a team acts on, and where tuned sits between rejected and chosen.

`verdict(run_dir, spec)` reads a finished run folder (summary.json, stats.parquet, reward_scores.parquet,
judgments.parquet, features.parquet, pairs.parquet) and returns summary.json's `verdict` and `gap` blocks;
`write_verdict` stores them and re-renders the report. The rules are written here once; the report, the command
line, the Prefect artifacts and `trend` read the answers from summary.json.

Each answer is {answer, because, rule, evidence}: answer is yes, no, unknown or not checked; because gives the
figures; rule is the same sentence for every run (its thresholds from VerdictSpec); evidence lists the report's
section ids.

- alignment: the held-out implicit-reward accuracy (Wilson CI at 1 - alpha against 0.5); the features that moved
  toward chosen (where chosen-vs-rejected is itself significant) are stated beside it.
- better: only judges calibrated on this run's held-out labels (agreement CI's lower bound above calibration_bar)
  answer; a judge says yes where its tuned-vs-base win-rate CI lies above 0.5 and so does its length-controlled
  rate (fitted on the same per-pair rows, not an extrapolation), no where both lie below.
- forgetting: each benchmark task's primary metric, BH across tasks (q_primary).
- gaming: beside a win, the raw rate above 0.5 where the length-controlled one is not; two judges that agree no
  better than kappa_bar per prompt; more significant features moving away from chosen than toward it.

The gap: on a judge's scale, rejected at 0 and chosen at 1; position(s) = (mean r(s) - mean r(rejected)) /
(mean r(chosen) - mean r(rejected)); closed = position(tuned) - position(base) = (mean r(tuned) - mean r(base)) /
(mean r(chosen) - mean r(rejected)); a percentile bootstrap over prompts (the pairs of one prompt resampled
together; numerator and denominator from the same resample). Built for the reward model (a score per text); an
LLM judge needs comparisons linking {tuned, base} to {chosen, rejected}, which are not judged yet.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.config import VerdictSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import jsonable
from dpo_eval.stats.paired import wilson
from dpo_eval.studies.readings import (  # noqa: F401  (RM, reward_outcomes: importers read them here)
    RM,
    SEPARATION,
    _at_level,
    _held_out_split,
    _lc_usable,
    _num,
    _pct,
    _read_json,
    _table,
    judge_outcomes,
    llm_judge_blocks,
    once_per_prompt,
    reward_outcomes,
)

QUESTIONS = ("alignment", "better", "forgetting", "gaming")
ANSWERS = ("yes", "no", "unknown", "not checked")
TITLES = {"alignment": "Did the alignment take?", "better": "Is the tuned model better than its base?",
          "forgetting": "Did it forget?", "gaming": "Could the gain be gaming?"}


def rules(spec: VerdictSpec) -> dict[str, str]:
    """The rule of each answer in words, with the thresholds of `spec`."""
    level = f"{1 - spec.alpha:.0%}"
    return {
        "alignment": (f"yes where the held-out implicit-reward accuracy's Wilson {level} CI lies above 0.5; no where it "
                      "lies below 0.5, or every held-out margin is 0 (the adapter changes nothing); unknown otherwise "
                      "or without a held-out split, labels or implicit rewards"),
        "better": (f"only judges whose held-out agreement with the labels has a {level} CI lower bound above "
                   f"{spec.calibration_bar:g} answer; yes where a judge's tuned-vs-base win-rate {level} CI lies above "
                   "0.5 and so does its length-controlled rate (not an extrapolation) and, for an LLM judge whose "
                   "answers' markdown was read, its style-controlled rate; no where they all lie below; "
                   "unknown where the judges disagree or none can tell; with several LLM judges (a panel) and two "
                   "or more calibrated judges, the per-prompt majority of the calibrated ones answers by the same "
                   "rule"),
        "forgetting": (f"yes where a benchmark task's primary metric dropped with BH q < {spec.alpha:g} across tasks; "
                       "no (no evidence) otherwise, with the smallest drop the questions could detect, unknown where a "
                       "task did not run; not checked without a forgetting stage"),
        "gaming": ("beside a calibrated judge's win: yes where the raw win rate lies above 0.5 but the length- or "
                   "style-controlled rate does not (or length alone separates wins from losses, tuned winning where "
                   f"longer), where two calibrated judges name different winners on at least "
                   f"{spec.disagreement_bar:.0%} of prompts with Cohen's kappa at most {spec.kappa_bar:g}, or where more "
                   "features moved significantly away from chosen than toward it (counting features whose "
                   "chosen-vs-rejected shift is significant); unknown where the length control is an extrapolation or "
                   "undefined; no without such a signal or without a win; with a panel, the majority's win and "
                   "every pair of calibrated judges"),
    }


def _answer(answer: str, because: str, rule: str, evidence: list[str], **extra) -> dict:
    assert answer in ANSWERS, answer
    return {"answer": answer, "because": because, "rule": rule, "evidence": evidence, **extra}


def _latest_judgments(run_dir: Path) -> pl.DataFrame | None:
    """judgments.parquet's rows of the latest LLM judge (summary.json's `judge.id`; the panel's other members have
    their own rows there)."""
    from dpo_eval.judges.panel import own_rows

    judge = (_read_json(run_dir / "summary.json").get("judge") or {}).get("id")
    return own_rows(_table(run_dir, "judgments.parquet"), judge)


# ---------------------------------------------------------------- alignment

def alignment(summary: dict, spec: VerdictSpec, rule: str) -> dict:
    """Did the alignment take? From the held-out implicit-reward accuracy (see `rules`)."""
    evidence = ["implicit_rewards", "moved"]
    labels = summary.get("labels")
    if isinstance(labels, dict) and labels.get("source") == "none":
        return _answer("unknown", "the data set has no chosen and rejected answers to check the adapter against",
                       rule, evidence)
    n_valid = (summary.get("n_pairs") or {}).get("valid", 0)
    toward = (summary.get("significant_toward_chosen") or {}).get("valid")
    moved = ((summary.get("significant") or {}).get("tuned_vs_base") or {}).get("valid")
    features = (f"; {toward} of the {moved} features that moved significantly on valid moved toward chosen"
                if toward is not None and moved is not None else "")
    if not n_valid:
        return _answer("unknown", "no held-out (valid) pairs: the adapter records no training split and the data set "
                       "has no valid share" + features, rule, evidence)
    reward = (summary.get("implicit_reward") or {}).get("valid")
    if not reward or not reward.get("n"):
        return _answer("unknown", "implicit rewards were not computed on held-out pairs" + features, rule, evidence)
    n, accuracy, ties = int(reward["n"]), _num(reward.get("accuracy")), int(reward.get("ties") or 0)
    if not math.isfinite(accuracy):
        return _answer("unknown", "the held-out implicit-reward accuracy is missing from summary.json" + features,
                       rule, evidence)
    correct = round(accuracy * n)
    low, high = wilson(correct, n, 1 - spec.alpha)
    said = (f"held-out implicit-reward accuracy {_pct(accuracy)} [{_pct(low)}, {_pct(high)}] on {n} valid pairs"
            + (f" ({ties} ties)" if ties else "") + features)
    if ties == n:
        return _answer("no", f"every one of the {n} held-out margins is 0: the adapter changes no log-probability "
                       "(" + said + ")", rule, evidence, ci=[low, high], n=n)
    if low > 0.5:
        return _answer("yes", said, rule, evidence, ci=[low, high], n=n)
    if high < 0.5:
        return _answer("no", said + ": the tuned policy prefers rejected", rule, evidence, ci=[low, high], n=n)
    return _answer("unknown", said + ": the CI includes 0.5", rule, evidence, ci=[low, high], n=n)


# ---------------------------------------------------------------- per-pair verdicts of each judge

def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items: (p_o - p_e) / (1 - p_e), p_e from each rater's
    marginal shares; NaN without items, 1 where both raters use one and the same label throughout."""
    if len(a) != len(b):
        raise ValueError("cohen_kappa: the two raters label different numbers of items")
    if not a:
        return math.nan
    labels = sorted(set(a) | set(b))
    x, y = np.array(a), np.array(b)
    p_o = float((x == y).mean())
    p_e = float(sum((x == label).mean() * (y == label).mean() for label in labels))
    if p_e == 1.0:
        return 1.0 if p_o == 1.0 else math.nan
    return (p_o - p_e) / (1 - p_e)


# ---------------------------------------------------------------- better

def _sc_usable(block: dict) -> bool | None:
    """Whether the style-controlled rate lies above 0.5 (True) or not (False); None where there is none to read
    (no answer texts, no fit, or an extrapolation)."""
    rate = block.get("sc_win_rate")
    if rate is None or not math.isfinite(rate) or block.get("sc_extrapolated") is not False:
        return None
    return rate > 0.5


def judge_answer(name: str, calibration: dict, win: dict, spec: VerdictSpec) -> dict:
    """One judge's answer to 'is the tuned model better?' from its held-out calibration {agreement, ci_low,
    ci_high, n} and its tuned-vs-base block {win_rate, ci_low, ci_high, n, lc_win_rate, lc_extrapolated, ...}."""
    agree = (f"agreement with the labels {_pct(calibration['agreement'])} [{_pct(calibration['ci_low'])}, "
             f"{_pct(calibration['ci_high'])}] on {calibration['n']} held-out pairs")
    out = {"judge": name, "split": win.get("split"), "calibration": calibration,
           "win_rate": win.get("win_rate"), "ci": [win.get("ci_low"), win.get("ci_high")], "n": win.get("n"),
           "wins": win.get("wins"), "losses": win.get("losses"), "ties": win.get("ties"),
           "lc_win_rate": win.get("lc_win_rate"), "lc_reason": win.get("lc_reason"),
           "lc_extrapolated": win.get("lc_extrapolated"), "length_diff": win.get("length_diff"),
           "sc_win_rate": win.get("sc_win_rate"), "sc_extrapolated": win.get("sc_extrapolated"),
           "longer_wins": win.get("longer_wins")}
    if calibration.get("none"):
        return out | {"calibrated": False, "answer": "unknown",
                      "because": f"the {name} has no calibration: it judged no chosen-vs-rejected pair on this split "
                                 "(a prompt set without labels: give a reference set)"}
    if not (_num(calibration["ci_low"]) > spec.calibration_bar):
        return out | {"calibrated": False, "answer": "unknown",
                      "because": f"the {name} could not tell chosen from rejected ({agree}, bar {spec.calibration_bar:g})"}
    rate, low, high, n = win.get("win_rate"), _num(win.get("ci_low")), _num(win.get("ci_high")), win.get("n")
    if not n:
        return out | {"calibrated": True, "answer": "unknown",
                      "because": f"the {name} ({agree}) has no tuned-vs-base prompt with a valid verdict"}
    said = f"the {name} ({agree}) prefers tuned on {_pct(rate)} [{_pct(low)}, {_pct(high)}] of {n} prompts"
    above, lc_said = _lc_usable(win)
    said += f", {lc_said}"
    style = _sc_usable(win)
    if style is not None:
        said += f", style-controlled rate {_pct(win['sc_win_rate'])}"
        if style != above:  # the two controls disagree (or length cannot say): neither backs the raw rate
            above = None
    if low > 0.5 and above is True:
        answer = "yes"
    elif high < 0.5 and above is False:
        answer = "no"
    else:
        answer = "unknown"
        if low > 0.5 or high < 0.5:
            said += ": the raw rate is decided but the length-controlled one does not back it"
        else:
            said += ": the CI includes 0.5"
    return out | {"calibrated": True, "answer": answer, "because": said}


def reward_model_blocks(summary: dict, run_dir: Path, spec: VerdictSpec) -> tuple[dict, dict, str] | None:
    """(calibration, tuned-vs-base block with its length control, split) of the reward model, or None."""
    from dpo_eval.judges.pairwise import answer_lengths
    from dpo_eval.judges.statistics import split_lc_win_rate

    block = summary.get("reward_model") or {}
    splits = block.get("splits") or {}
    split = _held_out_split(splits, {s: b.get("in_sample") for s, b in splits.items()})
    if split is None:
        return None
    s = splits[split]
    labelled = (block.get("reference_splits") or {}).get(split) or s  # questions without labels: the reference's
    n_cal = int(labelled.get("n") or 0)
    calibration = {"agreement": labelled["accuracy"], "n": n_cal}
    agreement = _num(labelled.get("accuracy"))
    calibration["ci_low"], calibration["ci_high"] = (_at_level(round(agreement * n_cal), n_cal, spec)
                                                     if n_cal and math.isfinite(agreement) else (math.nan, math.nan))
    n_win = int(s.get("win_n") or 0)
    won = _num(s.get("wins")) + _num(s.get("win_ties")) / 2
    low, high = _at_level(won, n_win, spec) if math.isfinite(won) else (math.nan, math.nan)
    win = {"split": split, "win_rate": s["win_rate"], "ci_low": low, "ci_high": high,
           "n": n_win, "wins": s["wins"], "losses": s["losses"], "ties": s["win_ties"]}
    scores, pairs = _table(run_dir, "reward_scores.parquet"), _table(run_dir, "pairs.parquet")
    lengths = answer_lengths(run_dir, _table(run_dir, "answers.parquet"), pairs) if pairs is not None else None
    if scores is not None and lengths is not None:
        from dpo_eval.judges.statistics import length_differences, length_sides

        diffs = length_differences(lengths)
        outcomes = once_per_prompt(reward_outcomes(scores, split), run_dir)
        rate, reason, side = split_lc_win_rate(outcomes, diffs)
        counted = outcomes.join(diffs, on=["pair_id", "split"])["length_diff"].to_numpy().astype(float)
        win |= {"lc_win_rate": rate, "lc_reason": reason, **side} | {
            key: value for key, value in length_sides(counted).items() if side.get(key) is None}
        if reason.startswith(SEPARATION):  # which side length favours: tuned winning where it is longer, or shorter
            joined = outcomes.join(diffs, on=["pair_id", "split"])
            won = joined.filter(pl.col("winner") == "tuned")["length_diff"].mean()
            lost = joined.filter(pl.col("winner") == "base")["length_diff"].mean()
            win["longer_wins"] = bool(won is not None and lost is not None and won > lost)
    else:
        win |= {"lc_win_rate": None, "lc_reason": "the reward scores or the answers' lengths are not in the run folder",
                "lc_extrapolated": None}
    return calibration, win, split


def better(judges: list[dict], rule: str, majority: dict | None = None, uncalibrated: str | None = None) -> dict:
    """Is the tuned model better? From the judges' own answers (`judge_answer`), or from a panel's majority of
    calibrated judges (`majority_answer`) where there is one; `uncalibrated` says why a judge that ran cannot
    answer (no split with both comparisons)."""
    evidence = ["reward_model", "judge"]
    if majority is not None:
        said = "; ".join(j["because"] for j in judges)
        return _answer(majority["answer"], f"{majority['because']} (each judge: {said})", rule, evidence + ["panel"],
                       judges=judges, majority=majority)
    if not judges and uncalibrated:
        return _answer("unknown", uncalibrated, rule, evidence, judges=[])
    if not judges:
        return _answer("not checked", "no reward model or LLM judge was run", rule, evidence, judges=[])
    calibrated = [j for j in judges if j["calibrated"]]
    said = "; ".join(j["because"] for j in judges)
    if not calibrated:
        return _answer("unknown", said, rule, evidence, judges=judges)
    answers = {j["answer"] for j in calibrated}
    if answers == {"yes", "no"} or {"yes", "no"} <= answers:
        return _answer("unknown", "the judges disagree: " + said, rule, evidence, judges=judges)
    answer = "yes" if "yes" in answers else "no" if "no" in answers else "unknown"
    return _answer(answer, said, rule, evidence, judges=judges)


# ---------------------------------------------------------------- forgetting

def forgetting(summary: dict, spec: VerdictSpec, rule: str) -> dict:
    """Did it forget? Each task's primary metric, BH across tasks."""
    evidence = ["forgetting"]
    block = summary.get("forgetting")
    if not block:
        return _answer("not checked", "no benchmark was run (give the evaluation lm-eval tasks: `forgetting: {tasks: [...]}` in its --config)", rule,
                       evidence)
    primaries = []
    for task, metrics in sorted((block.get("tasks") or {}).items()):
        for metric, s in metrics.items():
            if s.get("primary", True) and s.get("n"):
                primaries.append((task, metric, s))
    failed = sorted(block.get("failed") or [])
    if not primaries:
        return _answer("unknown", "no benchmark task ran to the end", rule, evidence)
    worse = [(t, m, s) for t, m, s in primaries
             if _num(s.get("q_primary", s.get("q_value"))) < spec.alpha and _num(s.get("delta")) < 0]
    if worse:
        said = "; ".join(f"{t} ({m}) dropped {-_num(s.get('delta')):.3f} [{-_num(s.get('ci_high')):.3f}, "
                         f"{-_num(s.get('ci_low')):.3f}], "
                         f"q = {s.get('q_primary', s.get('q_value')):.3g}, {s['n']} questions" for t, m, s in worse)
        return _answer("yes", said, rule, evidence, tasks=[t for t, _, _ in worse])
    # the smallest drop each task could detect: the distance from its delta to its CI's lower end
    detectable = {t: _num(s.get("delta")) - _num(s.get("ci_low")) for t, _, s in primaries
                  if math.isfinite(_num(s.get("delta")) - _num(s.get("ci_low")))}
    widest = max(detectable, key=detectable.get) if detectable else None
    said = (f"no task of {len(primaries)} dropped significantly on its primary metric (BH q < {spec.alpha:g})")
    if widest is not None:
        said += (f"; a drop smaller than about {detectable[widest]:.3f} could go unseen on {widest} "
                 "(its CI's half-width below the observed delta)")
    if failed:
        return _answer("unknown", said + f"; but {len(failed)} task(s) did not run ({', '.join(map(str, failed))}), "
                       "so forgetting there is not checked", rule, evidence, detectable=detectable, failed=failed)
    return _answer("no", said, rule, evidence, detectable=detectable)


# ---------------------------------------------------------------- gaming

def _feature_directions(stats: pl.DataFrame | None, alpha: float) -> tuple[int, int] | None:
    """(toward, away): valid features that tuned moved significantly, where chosen-vs-rejected is significant,
    in chosen's direction and against it."""
    if stats is None:
        return None
    rows = stats.filter(pl.col("split") == "valid")
    if rows.height == 0:
        return None
    cvr = rows.filter((pl.col("comparison") == "chosen_vs_rejected") & (pl.col("q_value") < alpha)).select(
        "feature", cvr=pl.col("norm_mean_delta"))
    tvb = rows.filter((pl.col("comparison") == "tuned_vs_base") & (pl.col("q_value") < alpha)).select(
        "feature", tvb=pl.col("norm_mean_delta"))
    both = tvb.join(cvr, on="feature").filter((pl.col("tvb") != 0) & (pl.col("cvr") != 0))
    toward = int((np.sign(both["tvb"].to_numpy()) == np.sign(both["cvr"].to_numpy())).sum())
    return toward, both.height - toward


def gaming(judges: list[dict], agreement: dict | None, directions: tuple[int, int] | None, rule: str,
           panel_pairs: list[dict] | None = None) -> dict:
    """Could the gain be gaming? Signals beside a win (see `rules`); a panel's pairs of judges replace the one
    agreement of the reward model and the LLM judge where given."""
    evidence = ["reward_model", "judge", "moved", "gaming"]
    if not judges:
        return _answer("not checked", "no reward model or LLM judge was run", rule, evidence, signals=[])
    winners = [j for j in judges if j["calibrated"] and _num(j["ci"][0]) > 0.5]
    if not winners:
        who = ("the panel's majority does not find" if [j["judge"] for j in judges] == ["panel majority"] else
               "no calibrated judge finds")
        return _answer("no", f"{who} tuned better than base (no win-rate CI above 0.5): no gain "
                       "to explain", rule, evidence, signals=[])
    signals, open_questions = [], []
    for j in winners:
        above, lc_said = _lc_usable(j)
        if above is False:
            signals.append(f"the {j['judge']}'s raw win rate {_pct(j['win_rate'])} [{_pct(j['ci'][0])}, "
                           f"{_pct(j['ci'][1])}] lies above 0.5 but its {lc_said} does not: length explains the win")
        elif (j.get("lc_reason") or "").startswith(SEPARATION) and j.get("longer_wins"):
            signals.append(f"length alone separates the {j['judge']}'s wins from its losses, and tuned wins where it "
                           "is the longer answer: length explains the win")
        elif above is None:
            open_questions.append(f"the {j['judge']}'s {lc_said.removeprefix('its ')}")
        if _sc_usable(j) is False:
            signals.append(f"the {j['judge']}'s raw win rate {_pct(j['win_rate'])} lies above 0.5 but its "
                           f"style-controlled rate {_pct(j['sc_win_rate'])} does not: markdown and length explain "
                           "the win")
    pairs = panel_pairs if panel_pairs is not None else [agreement] if agreement is not None else []
    for pair in pairs:
        if pair["n"] and pair.get("calibrated") and math.isfinite(pair["kappa"]) and pair["kappa"] <= pair["bar"] \
                and 1 - pair["agree"] >= pair["share_bar"]:
            who = f"judges {pair['a']} and {pair['b']}" if "a" in pair else "two judges"
            signals.append(f"the {who} name different winners of tuned vs base on {1 - pair['agree']:.0%} of "
                           f"{pair['n']} prompts (Cohen's kappa {pair['kappa']:.2f} <= {pair['bar']:g})")
    if directions is not None and directions[1] > directions[0]:
        signals.append(f"{directions[1]} features moved significantly away from chosen and {directions[0]} toward it")
    extra = {"signals": signals, "judge_agreement": agreement}
    if signals:
        return _answer("yes", "; ".join(signals), rule, evidence, **extra)
    if open_questions:
        return _answer("unknown", "a judge finds tuned better, but " + "; ".join(open_questions)
                       + ": length cannot be ruled out", rule, evidence, **extra)
    said = "a judge finds tuned better and no gaming signal fired (length-controlled rate above 0.5"
    said += (f"; {directions[0]} features toward chosen, {directions[1]} away" if directions else "")
    said += (f"; judges' kappa {agreement['kappa']:.2f}" if agreement and math.isfinite(agreement["kappa"]) else "")
    return _answer("no", said + ")", rule, evidence, **extra)


def judge_agreement(run_dir: Path, split: str | None, bar: float, share_bar: float = 1 / 3,
                    calibrated: bool = True) -> dict | None:
    """The reward model's and the LLM judge's per-prompt verdicts of tuned vs base on `split`: n, agree share,
    Cohen's kappa, and the pairs where they disagree (reward margin largest first), or None without both."""
    scores, judgments = _table(run_dir, "reward_scores.parquet"), _latest_judgments(run_dir)
    if split is None or scores is None or judgments is None:
        return None
    rm, llm = reward_outcomes(scores, split), judge_outcomes(judgments, split)
    both = once_per_prompt(rm.join(llm, on=["pair_id", "split"], suffix="_llm"), run_dir)
    if both.height == 0:
        return None
    a, b = both["winner"].to_list(), both["winner_llm"].to_list()
    disagree = both.filter(pl.col("winner") != pl.col("winner_llm"))["pair_id"].to_list()
    return {"n": both.height, "agree": float(np.mean(np.array(a) == np.array(b))), "kappa": cohen_kappa(a, b),
            "bar": bar, "share_bar": share_bar, "calibrated": calibrated, "disagree": disagree}


# ---------------------------------------------------------------- the gap

def cluster_means(values: np.ndarray, clusters: np.ndarray, resamples: int, seed: int,
                  chunk: int = 250) -> np.ndarray:
    """Column means of `values` (rows x k) over `resamples` bootstrap samples of whole clusters (rows sharing a
    cluster label drawn together): (resamples x k)."""
    labels, index = np.unique(clusters, return_inverse=True)
    g = labels.size
    sums = np.zeros((g, values.shape[1]))
    np.add.at(sums, index, values)
    counts = np.bincount(index, minlength=g).astype(float)
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, values.shape[1]))
    for start in range(0, resamples, chunk):
        draw = rng.integers(0, g, size=(min(chunk, resamples - start), g))
        out[start:start + draw.shape[0]] = sums[draw].sum(axis=1) / counts[draw].sum(axis=1)[:, None]
    return out


def gap(r: dict[str, np.ndarray], clusters: np.ndarray, level: float, resamples: int, seed: int) -> dict:
    """Positions of base and tuned with rejected at 0 and chosen at 1, the share of the gap closed, its
    percentile bootstrap CI over clusters (prompts), n; `undefined` with the reason where chosen and rejected are
    not separated (the denominator's CI reaches 0)."""
    values = np.column_stack([r["chosen"], r["rejected"], r["base"], r["tuned"]]).astype(float)
    n = values.shape[0]
    if n == 0:
        return {"undefined": "no pair has all four scores", "n": 0}
    c, j, b, t = values.mean(axis=0)
    boot = cluster_means(values, clusters, resamples, seed)
    den = boot[:, 0] - boot[:, 1]
    tail = (1 - level) / 2
    den_low, den_high = np.quantile(den, [tail, 1 - tail])
    out = {"n": int(n), "prompts": int(np.unique(clusters).size), "level": level, "resamples": resamples,
           "chosen_minus_rejected": float(c - j), "chosen_minus_rejected_ci": [float(den_low), float(den_high)]}
    if not (c - j > 0 and den_low > 0):
        return out | {"undefined": f"chosen and rejected are not separated on this scale (mean chosen - rejected "
                                   f"{c - j:.3g}, {level:.0%} CI [{den_low:.3g}, {den_high:.3g}])"}
    closed_boot = (boot[:, 3] - boot[:, 2]) / den
    low, high = np.quantile(closed_boot, [tail, 1 - tail])
    return out | {"base": float((b - j) / (c - j)), "tuned": float((t - j) / (c - j)),
                  "closed": float((t - b) / (c - j)), "ci": [float(low), float(high)]}


def reward_model_gap(run_dir: Path, split: str, spec: VerdictSpec) -> dict | None:
    """The reward model's gap on `split` from reward_scores.parquet, prompts from pairs.parquet."""
    scores, pairs = _table(run_dir, "reward_scores.parquet"), _table(run_dir, "pairs.parquet")
    if scores is None or pairs is None:
        return None
    part = scores.filter(pl.col("split") == split) if split != "all" else scores
    part = part.filter(pl.col("reward_model").is_finite())  # a NaN score is no score
    if part.height == 0:
        return None
    wide = part.pivot(on="role", index="pair_id", values="reward_model")
    if not {"chosen", "rejected", "base", "tuned"} <= set(wide.columns):
        return None
    wide = wide.drop_nulls(["chosen", "rejected", "base", "tuned"])
    prompt_cols = [c for c in ("system", "prompt", "messages") if c in pairs.columns]
    keyed = pairs.select("pair_id", cluster=pl.concat_str([pl.col(c).cast(pl.String).fill_null("")
                                                          for c in prompt_cols], separator="\x1f"))
    wide = wide.join(keyed, on="pair_id", how="left").with_columns(pl.col("cluster").fill_null(pl.col("pair_id")))
    block = gap({role: wide[role].to_numpy() for role in ("chosen", "rejected", "base", "tuned")},
                wide["cluster"].to_numpy(), 1 - spec.alpha, spec.resamples, spec.seed)
    return block | {"split": split}


BT_SYSTEMS = ("chosen", "base", "tuned")  # rejected is the reference (strength 0)


def bt_exists(first: list[str], second: list[str], outcome) -> bool:
    """Whether the Bradley-Terry maximum-likelihood fit exists (Ford's condition): every one of the four systems
    compared, and the 'beat at least once' graph (a tie counts both ways) strongly connected, so no group of
    systems wins, or loses, every comparison with the rest."""
    systems = ("rejected", *BT_SYSTEMS)
    beat = {s: set() for s in systems}
    for a, b, y in zip(first, second, np.asarray(outcome, dtype=float)):
        if y > 0:
            beat[a].add(b)
        if y < 1:
            beat[b].add(a)

    def reach(start: str, edges: dict) -> set:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    back = {s: {t for t in systems if s in beat[t]} for s in systems}
    return len(reach("rejected", beat)) == len(systems) == len(reach("rejected", back))


def bradley_terry(first: list[str], second: list[str], outcome: np.ndarray) -> np.ndarray | None:
    """Strengths of chosen, base, tuned (rejected 0) from pairwise outcomes (1: first wins, 0: second, 1/2: tie as a
    half row of each), by unpenalised logistic regression without intercept on +1 / -1 indicator differences.
    None where the fit does not converge (a system that wins or loses every comparison: no finite strength)."""
    from dpo_eval.judges.style import logistic_fit

    if not bt_exists(first, second, outcome):
        return None
    x = _bt_design(first, second)
    _, strengths, converged = logistic_fit(np.asarray(outcome, dtype=float), x, intercept=False, max_iter=2000)
    return strengths if converged else None


def _bt_design(first: list[str], second: list[str]) -> np.ndarray:
    """+1 / -1 indicators of chosen, base and tuned (rejected is the reference) per comparison."""
    x = np.zeros((len(first), len(BT_SYSTEMS)))
    for i, (a, b) in enumerate(zip(first, second)):
        if a in BT_SYSTEMS:
            x[i, BT_SYSTEMS.index(a)] += 1.0
        if b in BT_SYSTEMS:
            x[i, BT_SYSTEMS.index(b)] -= 1.0
    return x


def _bt_bootstrap(first: list[str], second: list[str], outcome: np.ndarray, index: np.ndarray, groups: int,
                  resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Bradley-Terry strengths of each cluster-bootstrap resample (prompts drawn with replacement; a prompt's rows
    go together) that has a finite fit (Ford's condition on its rows). The resamples are fitted at once by
    Newton's method with each row weighted by its prompt's draw count (the same likelihood as the resampled rows);
    one whose joint fit does not converge is refitted alone as bradley_terry does."""
    from dpo_eval.judges.style import weighted_logistic_fits

    draws = [rng.integers(0, groups, groups) for _ in range(resamples)]
    picks = [np.concatenate([np.flatnonzero(index == g) for g in draw]) for draw in draws]
    picks = [p for p in picks if bt_exists([first[i] for i in p], [second[i] for i in p], outcome[p])]
    if not picks:
        return []
    counts = np.stack([np.bincount(p, minlength=outcome.size) for p in picks]).astype(float)
    params, converged = weighted_logistic_fits(outcome, _bt_design(first, second), counts, intercept=False)
    boots = []
    for pick, fit, ok in zip(picks, params, converged):
        if not ok:
            fit = bradley_terry([first[i] for i in pick], [second[i] for i in pick], outcome[pick])
            if fit is None:
                continue
            fit = np.concatenate([[0.0], fit])
        boots.append(fit[1:])
    return boots


def llm_judge_gap(run_dir: Path, split: str, spec: VerdictSpec) -> dict | None:
    """The LLM judge's gap on `split`: a Bradley-Terry fit over rejected, chosen, base and tuned from the judged
    pairs of the gap sample (chosen vs rejected, tuned vs base, tuned and base vs chosen, both orders combined),
    positions = strength / strength(chosen), a percentile bootstrap over prompts; None without a gap sample."""
    from dpo_eval.judges.statistics import GAP_COMPARISONS, ROLES, combine_orders

    judgments = _latest_judgments(run_dir)
    if judgments is None:
        return None
    part = judgments if split == "all" else judgments.filter(pl.col("split") == split)
    sample = set(part.filter(pl.col("comparison").is_in(GAP_COMPARISONS))["pair_id"].to_list())
    if not sample:
        return None
    combined = combine_orders(part.filter(pl.col("pair_id").is_in(sorted(sample))))
    rows = combined.filter(pl.col("winner").is_in(["chosen", "rejected", "base", "tuned", "tie"]))
    first = [ROLES[c][0] for c in rows["comparison"].to_list()]
    second = [ROLES[c][1] for c in rows["comparison"].to_list()]
    outcome = np.array([1.0 if w == f else 0.5 if w == "tie" else 0.0 for w, f in zip(rows["winner"].to_list(), first)])
    pairs = _table(run_dir, "pairs.parquet")
    clusters = rows["pair_id"].to_numpy()
    if pairs is not None:
        from dpo_eval.data.pairs import prompt_table

        key = dict(prompt_table(pairs).iter_rows())
        clusters = np.array([key.get(p, p) for p in clusters])
    base_block = {"n": len(sample), "comparisons": int(rows.height), "split": split, "method":
                  "Bradley-Terry (unpenalised logistic, rejected at 0) over the gap sample's judged pairs; percentile "
                  "bootstrap over prompts"}
    strengths = bradley_terry(first, second, outcome)
    if strengths is None:
        return base_block | {"undefined": "the Bradley-Terry fit has no finite solution (a system won or lost every "
                                          "comparison of the sample)"}
    chosen, base, tuned = strengths
    labels, index = np.unique(clusters, return_inverse=True)
    rng = np.random.default_rng(spec.seed)
    boots = _bt_bootstrap(first, second, outcome, index, labels.size, spec.resamples // 4, rng)
    tail = spec.alpha / 2
    boots = np.array(boots) if boots else np.zeros((0, 3))
    base_block |= {"resamples": spec.resamples // 4, "fitted_resamples": len(boots), "level": 1 - spec.alpha,
                   "strengths": {"chosen": float(chosen), "base": float(base), "tuned": float(tuned)}}
    if len(boots) < (spec.resamples // 4) / 2:
        return base_block | {"undefined": f"only {len(boots)} of {spec.resamples // 4} bootstrap resamples have a "
                                          "finite Bradley-Terry fit: too few prompts to give an interval"}
    low_c, high_c = np.quantile(boots[:, 0], [tail, 1 - tail])
    if not (chosen > 0 and low_c > 0):
        return base_block | {"undefined": f"chosen and rejected are not separated on this judge's scale (strength of "
                                          f"chosen {chosen:.3g}, {1 - spec.alpha:.0%} CI [{low_c:.3g}, {high_c:.3g}])"}
    closed = (boots[:, 2] - boots[:, 1]) / boots[:, 0]
    low, high = np.quantile(closed, [tail, 1 - tail])
    return base_block | {"base": float(base / chosen), "tuned": float(tuned / chosen),
                         "closed": float((tuned - base) / chosen), "ci": [float(low), float(high)]}


def gap_sentence(name: str, block: dict) -> str:
    if "undefined" in block:
        return f"Gap closed on the {name}'s scale: undefined: {block['undefined']}."
    low, high = block["ci"]
    return (f"DPO closed {block['closed']:.1%} [{low:.1%}, {high:.1%}] of the rejected-to-chosen gap (base at "
            f"{block['base']:.2f}, tuned at {block['tuned']:.2f}, on the {name}'s scale, {block['n']} "
            f"{block['split']} {'prompts' if name == 'LLM judge' else 'pairs'}).")


# ---------------------------------------------------------------- the run

def verdict(run_dir: Path, spec: VerdictSpec | None = None) -> tuple[dict, dict]:
    """(verdict, gap) of the run folder `run_dir` (see the module docstring)."""
    answers, gaps, _ = assess(run_dir, spec)
    return answers, gaps


def _uncalibrated_judge(summary: dict, llm) -> str | None:
    """Why an LLM judge that ran gives no answer: it judged tuned vs base on no split where it also judged chosen vs
    rejected (a prompt set without labels, or --comparisons tuned_vs_base), so it has no calibration."""
    splits = (summary.get("judge") or {}).get("splits") or {}
    if llm is not None or not any("tuned_vs_base" in b for b in splits.values()):
        return None
    return ("an LLM judge ran, but it judged chosen vs rejected on no split where it judged tuned vs base (a prompt "
            "set without labels, or --comparisons tuned_vs_base), so it has no calibration and its win rate does "
            "not answer; give the run a labelled reference set (--reference-dataset) and judge both comparisons")


def assess(run_dir: Path, spec: VerdictSpec | None = None) -> tuple[dict, dict, dict | None]:
    """(verdict, gap, panel) of the run folder `run_dir`; panel None unless several LLM judges judged it."""
    run_dir = Path(run_dir)
    spec = spec or run_spec(run_dir)
    summary = _read_json(run_dir / "summary.json")
    said = rules(spec)
    judges, gaps = [], {}
    rm = reward_model_blocks(summary, run_dir, spec)
    if rm is not None:
        judges.append(judge_answer(RM, rm[0], rm[1], spec))
        block = reward_model_gap(run_dir, rm[2], spec)
        if block is not None:
            gaps[RM] = block | {"sentence": gap_sentence(RM, block)}
    from dpo_eval.studies.panel import majority_answer, panel_block, panel_members

    llm = llm_judge_blocks(summary, spec)
    members = panel_members(summary, spec)  # judges without calibration too: they enter the agreement only
    scored = [m for m in members if not m[2].get("none")]
    if len(scored) > 1:  # a panel: each LLM judge with a calibration answers under its own name
        judges += [judge_answer(f"LLM judge {m[0]}", m[2], m[3], spec) for m in scored]
    elif llm is not None:
        judges.append(judge_answer("LLM judge", llm[0], llm[1], spec))
    if llm is not None:
        block = llm_judge_gap(run_dir, llm[2], spec)
        if block is not None:
            gaps["LLM judge"] = block | {"sentence": gap_sentence("LLM judge", block)}
    agreement = (judge_agreement(run_dir, rm[2], spec.kappa_bar, spec.disagreement_bar,
                                 calibrated=all(j["calibrated"] for j in judges)) if rm and llm else None)
    directions = _feature_directions(_table(run_dir, "stats.parquet"), spec.alpha)
    panel = panel_block(run_dir, spec, rm, judges, members, llm[2] if llm else None) if len(members) > 1 else None
    reads = panel is not None and panel["reads_verdict"] and len(scored) > 1  # else the panel informs only
    majority = majority_answer(panel["majority"]) if reads else None
    answers = {"alignment": alignment(summary, spec, said["alignment"]),
               "better": better(judges, said["better"], majority, _uncalibrated_judge(summary, llm)),
               "forgetting": forgetting(summary, spec, said["forgetting"]),
               "gaming": gaming([majority] if majority else judges, agreement, directions, said["gaming"],
                                panel_pairs=panel["pairs"] if reads else None)}
    if gaps:
        answers["gap_line"] = " ".join(block["sentence"] for block in gaps.values())
    return answers, gaps, panel


def run_spec(run_dir: Path) -> VerdictSpec:
    """The run's verdict rules from its config.json (the defaults where it has none)."""
    config = _read_json(Path(run_dir) / "config.json").get("config") or {}
    return VerdictSpec.model_validate(config.get("verdict") or {})


def write_verdict(run_dir: Path, spec: VerdictSpec | None = None) -> dict:
    """Set summary.json's `verdict` and `gap`, add (or drop) the report's section of the prompts where the judges
    disagree, re-render the report; returns the summary."""
    from dpo_eval.report.page import read_sections, render_report, write_sections

    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        raise DpoEvalError(f"{run_dir}: no summary.json; give the run directory of `dpo-eval evaluate` (or of a "
                           "judge run)")
    answers, gaps, panel = assess(run_dir, spec)
    path = run_dir / "summary.json"
    summary = _read_json(path)
    summary["verdict"], summary["gap"] = answers, gaps
    summary.pop("panel", None)
    if panel is not None:
        summary["panel"] = panel
    path.write_text(json.dumps(jsonable(summary), indent=2))
    sections = [s for s in read_sections(run_dir) if s.id not in (DISAGREEMENT_SECTION, PANEL_SECTION)]
    if panel is not None:
        from dpo_eval.report.judge import panel_section

        sections.append(panel_section(jsonable(panel)))
    agreement = answers["gaming"].get("judge_agreement")
    if agreement and agreement["disagree"]:
        sections.append(disagreement_section(run_dir, agreement))
    write_sections(run_dir, sections)
    render_report(run_dir)
    return summary


DISAGREEMENT_SECTION = "gaming"
PANEL_SECTION = "panel"
SHOWN_DISAGREEMENTS = 10
CUT = 240


def disagreement_section(run_dir: Path, agreement: dict):
    """The prompts where the reward model and the LLM judge disagree on tuned vs base, the reward model's margin
    largest first, with the four answers side by side."""
    from dpo_eval.report.page import Section

    pairs, answers = _table(run_dir, "pairs.parquet"), _table(run_dir, "answers.parquet")
    scores = _table(run_dir, "reward_scores.parquet")
    judgments = _latest_judgments(run_dir)
    ids = agreement["disagree"]
    margin = scores.filter(pl.col("role").is_in(["tuned", "base"]) & pl.col("pair_id").is_in(ids)).pivot(
        on="role", index="pair_id", values="reward_model").select(
        "pair_id", margin=pl.col("tuned") - pl.col("base"))
    llm = judge_outcomes(judgments, "all").select("pair_id", llm="winner")
    wide = answers.pivot(on="model", index="pair_id", values="answer") if answers is not None else None
    table = pairs.join(margin, on="pair_id").join(llm, on="pair_id", how="left")
    if wide is not None:
        table = table.join(wide, on="pair_id", how="left")
    table = table.sort(pl.col("margin").abs(), descending=True).head(SHOWN_DISAGREEMENTS)

    def cut(text) -> str:
        text = "" if text is None else str(text)
        return text if len(text) <= CUT else text[:CUT] + " [...]"

    rows = [[cut(r["prompt"]), cut(r["chosen"]), cut(r["rejected"]), cut(r.get("base")), cut(r.get("tuned")),
             f"{'tuned' if r['margin'] > 0 else 'base' if r['margin'] < 0 else 'tie'} ({r['margin']:+.3g})",
             r["llm"] or "n/a"] for r in table.iter_rows(named=True)]
    said = (f"The reward model and the LLM judge name different winners of tuned vs base on {len(ids)} of "
            f"{agreement['n']} prompts (agreement {agreement['agree']:.0%}, Cohen's kappa {agreement['kappa']:.2f}); "
            f"the {len(rows)} where the reward model's margin (tuned - base) is largest are shown, with the four "
            "answers side by side.")
    return Section(DISAGREEMENT_SECTION, "Where the judges disagree", [said],
                   ["prompt", "chosen", "rejected", "base", "tuned", "reward model", "LLM judge"], rows)


def verdict_lines(summary: dict) -> list[str]:
    """The four answers as lines for a terminal (and the gap line where there is one)."""
    block = summary.get("verdict") or {}
    lines = [f"{TITLES[q]} {block[q]['answer']}: {block[q]['because']}" for q in QUESTIONS if q in block]
    if block.get("gap_line"):
        lines.append(block["gap_line"])
    return lines
