"""Statistics of pairwise judge verdicts (issue 12): win rate, calibration on the labels, position bias.

Input is the `judgments.parquet` table: one row per pair x comparison x order with columns
`pair_id, split, comparison, judge, order (ab|ba), shown_first (role), verdict (first|second|tie|invalid|failed),
winner (role | tie | invalid | failed)` (the other contract columns are carried, not used). Every pair is judged
in both orders; `combine_orders` folds the two verdicts into one winner per pair, and `judge_summary`
computes the `summary.json` `judge.splits` block from the combined winners.

Lengths for the length-controlled win rate come as a separate frame `pair_id, split, role, length`
(one row per answer; `features.parquet`'s `n_tokens` renamed to `length` is the intended source). The
unit does not matter: the length difference is divided by its own standard deviation, so tokens,
characters or words of a linear scale give the same LC win rate.
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
from scipy import stats as sps
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from dpo_eval.data.pairs import one_pair_per_prompt
from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.style import SC_RESAMPLES, split_sc_win_rate, style_differences
from dpo_eval.judges.style import unpenalised as _unpenalised
from dpo_eval.stats.paired import wilson

ROLES = {"tuned_vs_base": ("tuned", "base"), "chosen_vs_rejected": ("chosen", "rejected"),
         "tuned_vs_chosen": ("tuned", "chosen"), "base_vs_chosen": ("base", "chosen")}
# judged on a budgeted sample of prompts (JudgeSpec.gap_sample) so a Bradley-Terry fit links {tuned, base} with
# {chosen, rejected}: the LLM judge's gap (dpo_eval.studies.verdict)
GAP_COMPARISONS = ("tuned_vs_chosen", "base_vs_chosen")
ORDERS = ("ab", "ba")
VERDICTS = ("first", "second", "tie", "invalid", "failed")  # failed: the server refused the request (a 4xx)
REQUIRED = ("pair_id", "split", "comparison", "judge", "order", "shown_first", "verdict", "winner")
KEYS = ["judge", "split", "comparison", "pair_id"]
SIGN_TEST = "two-sided binomial sign test of wins vs losses (scipy.stats.binomtest, p = 1/2), ties excluded"
CI_METHOD = ("Wilson score interval on k = wins + ties/2 of the n valid pairs (a tie counted as half a success "
             "with a success's variance, so with many ties the interval is conservative)")
LC_METHOD = ("logistic regression (scikit-learn, unpenalised) of the combined per-pair outcome (tuned win 1, loss 0, "
             "tie 1/2 on each), one row per pair counted in n, on tanh(length difference / its sd) plus an "
             "intercept, predicted at difference 0")
# The LC win rate is a prediction at zero length difference; where fewer than this share of the pairs lie at or on
# one side of zero, that prediction is an extrapolation beyond the data and is flagged (lc_extrapolated).
LC_SIDE_SHARE = 0.1


def check_judgments(judgments: pl.DataFrame) -> None:
    """Raise DpoEvalError where the table breaks the judgments contract (columns, values, duplicate orders,
    or a `winner` that disagrees with `verdict` and `shown_first`)."""
    missing = [c for c in REQUIRED if c not in judgments.columns]
    if missing:
        raise DpoEvalError(f"judgments table lacks column(s) {missing}: it needs {list(REQUIRED)}")
    for column, allowed in (("comparison", tuple(ROLES)), ("order", ORDERS), ("verdict", VERDICTS)):
        bad = set(judgments[column].unique().to_list()) - set(allowed)
        if bad:
            raise DpoEvalError(f"judgments column {column!r} holds {sorted(map(str, bad))}; allowed: {list(allowed)}")
    dup = judgments.group_by(KEYS + ["order"]).len().filter(pl.col("len") > 1)
    if dup.height:
        row = dup.row(0, named=True)
        raise DpoEvalError(f"pair {row['pair_id']!r} ({row['split']}, {row['comparison']}) has order "
                           f"{row['order']!r} {row['len']} times: keep one judgment per pair and order")
    wrong = judgments.with_columns(expected=expected_winner()).filter(pl.col("winner").ne_missing(pl.col("expected")))
    if wrong.height:
        row = wrong.row(0, named=True)
        raise DpoEvalError(f"pair {row['pair_id']!r} order {row['order']!r}: winner {row['winner']!r} does not "
                           f"follow from verdict {row['verdict']!r} with {row['shown_first']!r} shown first")


def expected_winner() -> pl.Expr:
    """The winner that `verdict` and `shown_first` imply: first -> shown_first, second -> the comparison's
    other role, tie and invalid -> themselves; null where shown_first is not a role of the comparison."""
    other = pl.lit(None, dtype=pl.String)
    for comparison, (a, b) in ROLES.items():
        here = pl.col("comparison") == comparison
        other = (pl.when(here & (pl.col("shown_first") == a)).then(pl.lit(b))
                 .when(here & (pl.col("shown_first") == b)).then(pl.lit(a)).otherwise(other))
    return (pl.when(pl.col("verdict") == "first").then(pl.when(other.is_not_null()).then(pl.col("shown_first")))
            .when(pl.col("verdict") == "second").then(other)
            .otherwise(pl.col("verdict")))


def combine_orders(judgments: pl.DataFrame) -> pl.DataFrame:
    """One row per judge x split x comparison x pair: `winner_ab`, `winner_ba`, the combined `winner` and
    `consistent`.

    winner = the common winner where both orders agree (a role or tie); tie where they disagree (one tie and
    one role included); failed where either order was refused by the server; invalid where either order is
    invalid (counted, never turned into a tie); incomplete where an order is missing (a budget stop). consistent = winner_ab == winner_ba, null unless
    both orders are valid.
    """
    check_judgments(judgments)
    wide = judgments.group_by(KEYS, maintain_order=True).agg(
        [pl.col("winner").filter(pl.col("order") == o).first().alias(f"winner_{o}") for o in ORDERS])
    ab, ba = pl.col("winner_ab"), pl.col("winner_ba")
    both = ab.is_not_null() & ba.is_not_null() & ~ab.is_in(["invalid", "failed"]) & ~ba.is_in(["invalid", "failed"])
    winner = (pl.when((ab == "failed") | (ba == "failed")).then(pl.lit("failed"))
              .when((ab == "invalid") | (ba == "invalid")).then(pl.lit("invalid"))
              .when(ab.is_null() | ba.is_null()).then(pl.lit("incomplete"))
              .when(ab == ba).then(ab).otherwise(pl.lit("tie")))
    return wide.with_columns(winner=winner, consistent=pl.when(both).then(ab == ba))


def position_consistency(combined: pl.DataFrame) -> float:
    """Share of pairs whose two orders name the same winner (a role or tie), over the pairs with two valid
    verdicts: #{winner_ab == winner_ba} / #{both valid}. NaN where there is no such pair."""
    consistent = combined["consistent"].drop_nulls()
    return float(consistent.mean()) if consistent.len() else float("nan")


def first_position_rate(judgments: pl.DataFrame) -> float:
    """Share of `first` among the valid per-order verdicts: #{first} / #{first, second, tie}. An unbiased
    judge gives about the share of decided verdicts over 2; a judge that always answers A gives 1."""
    valid = judgments.filter(pl.col("verdict").is_in(["first", "second", "tie"]))
    return float((valid["verdict"] == "first").mean()) if valid.height else float("nan")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins among wins + losses against 1/2 (ties excluded). NaN with no
    decided pair."""
    if wins + losses == 0:
        return float("nan")
    return float(sps.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def lc_win_rate(outcome: np.ndarray, length_diff: np.ndarray) -> tuple[float, str]:
    """Length-controlled win rate in the manner of AlpacaEval 2 (without its instruction-difficulty term):
    (rate, reason), the reason empty when the fit is regular.

    Per valid pair (its two orders combined, as the win rate counts it), outcome y = 1 (tuned wins), 0 (base
    wins) or 1/2 (tie: one row of each outcome, weight 1/2 each) and x = tanh(d / sd(d)), d = length(tuned) - length(base), sd over the same
    rows (ddof 0; d is scaled, not centred, so x = 0 is still equal length). Fit P(y = 1) =
    sigmoid(a + b x) by unpenalised maximum likelihood (scikit-learn LogisticRegression); the LC win rate
    is sigmoid(a), the prediction at zero length difference. NaN with a reason where the fit does not
    exist: no rows with lengths, every outcome the same, no length variation, or complete separation
    (length alone decides every verdict, so b and the prediction at 0 are unbounded). Quasi-complete
    separation (outcomes overlap only at one x, e.g. ties at equal length) has a limit that a converged
    fit reaches; the reason says so.
    """
    y, d = np.asarray(outcome, dtype=float), np.asarray(length_diff, dtype=float)
    ok = np.isfinite(d) & np.isfinite(y)
    notes = [f"{int((~ok).sum())} pair(s) without lengths left out"] if (~ok).any() else []
    y, d = y[ok], d[ok]
    if y.size == 0:
        return float("nan"), "no valid tuned-vs-base pair with both answers' lengths"
    if np.all(y == 1) or np.all(y == 0):
        return float("nan"), f"every valid pair is a {'win' if y[0] == 1 else 'loss'} for tuned: no finite fit"
    sd = d.std()
    if sd == 0:
        return float("nan"), "no length variation: the length effect cannot be told from the intercept"
    x = np.tanh(d / sd)
    wins_x, losses_x = x[y > 0], x[y < 1]  # a tie sits in both
    if losses_x.max() < wins_x.min() or wins_x.max() < losses_x.min():
        return float("nan"), "complete separation: length alone decides every verdict, the fit has no finite solution"
    if losses_x.max() == wins_x.min() or wins_x.max() == losses_x.min():
        notes.append("quasi-complete separation: length decides every verdict away from one length difference; "
                     "the slope is unbounded and the rate is the limit fixed by the verdicts there")
    X = np.concatenate([x, x])[:, None]
    Y = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    W = np.concatenate([y, 1 - y])
    keep = W > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(max_iter=1000, **_unpenalised()).fit(X[keep], Y[keep], sample_weight=W[keep])
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append("the logistic fit did not converge in 1000 iterations")
    return float(model.predict_proba(np.zeros((1, 1)))[0, 1]), "; ".join(notes)


def length_differences(lengths: pl.DataFrame) -> pl.DataFrame:
    """`pair_id, split, length_diff` = length(tuned) - length(base) from a `pair_id, split, role, length` frame."""
    missing = [c for c in ("pair_id", "split", "role", "length") if c not in lengths.columns]
    if missing:
        raise DpoEvalError(f"lengths frame lacks column(s) {missing}: it needs pair_id, split, role, length")
    if lengths.select(pl.struct("pair_id", "split", "role").is_duplicated().any()).item():
        raise DpoEvalError("lengths frame has more than one length for a pair_id, split and role")

    def one(role: str) -> pl.DataFrame:
        return lengths.filter(pl.col("role") == role).select(
            "pair_id", "split", pl.col("length").cast(pl.Float64).alias(role))

    both = one("tuned").join(one("base"), on=["pair_id", "split"], how="inner")
    return both.select("pair_id", "split", length_diff=pl.col("tuned") - pl.col("base"))


def _counts(combined: pl.DataFrame, roles: tuple[str, str]) -> dict:
    winner = combined["winner"]
    return {"n": int(winner.is_in([*roles, "tie"]).sum()), "wins": int((winner == roles[0]).sum()),
            "losses": int((winner == roles[1]).sum()), "ties": int((winner == "tie").sum()),
            "invalid": int((winner == "invalid").sum()), "incomplete": int((winner == "incomplete").sum()),
            "failed": int((winner == "failed").sum())}


def _valid(combined: pl.DataFrame) -> pl.DataFrame:
    """The pairs counted in n: both orders made and valid."""
    return combined.filter(~pl.col("winner").is_in(["invalid", "incomplete", "failed"]))


def _scores(combined: pl.DataFrame, first_role: str) -> np.ndarray:
    """Per valid pair: 1 where the first role wins, 1/2 for a tie, 0 where the other role wins."""
    valid = _valid(combined)
    return np.where(valid["winner"] == first_role, 1.0, np.where(valid["winner"] == "tie", 0.5, 0.0))


def comparison_summary(judgments: pl.DataFrame, comparison: str, diffs: pl.DataFrame | None, *, seed: int,
                       n_boot: int, alpha: float, style_diffs: pl.DataFrame | None = None,
                       prompts: pl.DataFrame | None = None) -> dict:
    """The summary block of one split and comparison (judgments already filtered to them); tuned vs base counts
    one pair per prompt where `prompts` is given (data.pairs.one_pair_per_prompt)."""
    if comparison == "tuned_vs_base":
        judgments = one_pair_per_prompt(judgments, prompts)
    combined = combine_orders(judgments)
    roles = ROLES[comparison]
    counts, scores = _counts(combined, roles), _scores(combined, roles[0])
    rate = float(scores.mean()) if scores.size else float("nan")
    # Wilson, not a bootstrap: a percentile bootstrap collapses to [1, 1] at 29 of 29 (coverage 0.78 at a true
    # 0.95, n = 30, in the audit's simulation); Wilson never does. seed and n_boot are kept for the callers.
    low, high = wilson(float(scores.sum()), int(scores.size), 1 - alpha)
    common = {"ci_low": low, "ci_high": high, "position_consistency": position_consistency(combined),
              "first_position_rate": first_position_rate(judgments),
              "invalid": counts["invalid"], "incomplete": counts["incomplete"], "failed": counts["failed"]}
    if comparison == "chosen_vs_rejected":
        return {"n": counts["n"], "agreement": rate, **common}
    if comparison in GAP_COMPARISONS:  # the gap's links: counts and rate only (lengths are tuned - base)
        return {"n": counts["n"], "wins": counts["wins"], "losses": counts["losses"], "ties": counts["ties"],
                "win_rate": rate, **common}
    lc, why, side = split_lc_win_rate(combined, diffs)
    style = split_sc_win_rate(combined, style_diffs, resamples=SC_RESAMPLES, seed=seed, level=1 - alpha)
    return {"n": counts["n"], "wins": counts["wins"], "losses": counts["losses"], "ties": counts["ties"],
            "win_rate": rate, **common, "p_value": sign_test(counts["wins"], counts["losses"]),
            "sign_test": SIGN_TEST, "lc_win_rate": lc, "lc_reason": why, **side, **style}


def length_sides(d: np.ndarray) -> dict:
    """Where the length differences lie: the share of pairs with tuned longer, shorter, equal, their range, and
    whether a prediction at difference 0 is an extrapolation: fewer than LC_SIDE_SHARE of the pairs at or on one
    side of 0 (pairs of equal length are data at 0 itself)."""
    d = d[np.isfinite(d)]
    if d.size == 0:
        return {"lc_extrapolated": None, "length_diff": None}
    longer, shorter = float((d > 0).mean()), float((d < 0).mean())
    at_or_above, at_or_below = float((d >= 0).mean()), float((d <= 0).mean())
    return {"lc_extrapolated": bool(min(at_or_above, at_or_below) < LC_SIDE_SHARE),
            "length_diff": {"share_tuned_longer": longer, "share_tuned_shorter": shorter,
                            "share_equal": float((d == 0).mean()), "min": float(d.min()), "max": float(d.max())}}


def split_lc_win_rate(combined: pl.DataFrame, diffs: pl.DataFrame | None) -> tuple[float, str, dict]:
    """(lc_win_rate, reason, length_sides) over the valid tuned-vs-base pairs of one split (the rows the win rate
    counts), lengths joined by pair. An extrapolated rate keeps its value and says so in the reason."""
    if diffs is None:
        return float("nan"), "no answer lengths given", {"lc_extrapolated": None, "length_diff": None}
    rows = _valid(combined).join(diffs, on=["pair_id", "split"], how="left")
    outcome = np.where(rows["winner"] == "tuned", 1.0, np.where(rows["winner"] == "tie", 0.5, 0.0))
    d = rows["length_diff"].to_numpy().astype(float)
    rate, reason = lc_win_rate(outcome, d)
    side = length_sides(d)
    if not np.isfinite(rate):  # no rate to call an extrapolation
        side["lc_extrapolated"] = None
    if side["lc_extrapolated"]:
        spread = side["length_diff"]
        note = (f"an extrapolation: {spread['share_tuned_longer']:.0%} of pairs have the tuned answer longer and "
                f"{spread['share_tuned_shorter']:.0%} shorter (differences {spread['min']:g} to {spread['max']:g}), "
                "so the rate at equal length lies outside the data; do not read it as the judge's preference")
        reason = "; ".join(filter(None, [reason, note]))
    return rate, reason, side


def judge_summary(judgments: pl.DataFrame, lengths: pl.DataFrame | None = None, *, seed: int = 0,
                  n_boot: int = 2000, alpha: float = 0.05, styles: pl.DataFrame | None = None,
                  prompts: pl.DataFrame | None = None) -> dict:
    """`summary.json`'s judge statistics for one judge: {invalid, incomplete, ci_method, lc_method, splits:
    {split: {comparison: block}}}, comparisons present in the table only.

    tuned_vs_base (one pair per prompt where `prompts` {pair_id, prompt_id} is given): n (valid pairs), wins, losses, ties, win_rate = (wins + ties/2) / n, its Wilson CI on
    k = wins + ties/2 (ci_low, ci_high at level 1 - alpha), p_value (sign test, ties excluded), lc_win_rate
    (lc_win_rate on the same per-pair rows; NaN with lc_reason), lc_extrapolated and length_diff
    (length_sides), the style-controlled sc_* block (dpo_eval.judges.style: sc_win_rate with its CI and the
    covariates' coefficients; NaN with sc_reason without `styles`), position_consistency, first_position_rate.
    chosen_vs_rejected: n, agreement = (#chosen + #ties/2) / n with its Wilson CI, position_consistency,
    first_position_rate. Both carry invalid (pairs with an invalid verdict, outside n), failed (pairs the
    server refused, outside n) and incomplete (pairs missing an order, outside n). Top-level invalid and failed
    count per-order verdicts.
    """
    check_judgments(judgments)
    judges = judgments["judge"].unique().to_list()
    if len(judges) > 1:
        raise DpoEvalError(f"judgments hold several judges {sorted(judges)}: summarise one judge at a time")
    diffs = length_differences(lengths) if lengths is not None else None
    style_diffs = style_differences(styles) if styles is not None else None
    splits: dict = {}
    for (split, comparison), part in judgments.sort("split", "comparison").group_by(
            ["split", "comparison"], maintain_order=True):
        splits.setdefault(split, {})[comparison] = comparison_summary(
            part, comparison, diffs, seed=seed, n_boot=n_boot, alpha=alpha, style_diffs=style_diffs, prompts=prompts)
    incomplete = sum(block["incomplete"] for blocks in splits.values() for block in blocks.values())
    return {"invalid": int((judgments["verdict"] == "invalid").sum()),
            "failed": int((judgments["verdict"] == "failed").sum()), "incomplete": incomplete,
            "ci_method": f"{CI_METHOD}, level {1 - alpha:g}", "lc_method": LC_METHOD,
            "splits": splits}
