"""Statistics of pairwise judge verdicts (issue 12): win rate, calibration on the labels, position bias.

Input is the `judgments.parquet` table: one row per pair x comparison x order with columns
`pair_id, split, comparison, judge, order (ab|ba), shown_first (role), verdict (first|second|tie|invalid),
winner (role | tie | invalid)` (the other contract columns are carried, not used). Every pair is judged
in both orders; `combine_orders` folds the two verdicts into one winner per pair, and `judge_summary`
computes the `summary.json` `judge.splits` block from the combined winners.

Lengths for the length-controlled win rate come as a separate frame `pair_id, split, role, length`
(one row per answer; `features.parquet`'s `n_tokens` renamed to `length` is the intended source). The
unit does not matter: the length difference is divided by its own standard deviation, so tokens,
characters or words of a linear scale give the same LC win rate.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import polars as pl
import sklearn
from scipy import stats as sps
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from dpo_eval.errors import DpoEvalError
from dpo_eval.stats.paired import resample_counts

ROLES = {"tuned_vs_base": ("tuned", "base"), "chosen_vs_rejected": ("chosen", "rejected")}
ORDERS = ("ab", "ba")
VERDICTS = ("first", "second", "tie", "invalid")
REQUIRED = ("pair_id", "split", "comparison", "judge", "order", "shown_first", "verdict", "winner")
KEYS = ["judge", "split", "comparison", "pair_id"]
SIGN_TEST = "two-sided binomial sign test of wins vs losses (scipy.stats.binomtest, p = 1/2), ties excluded"
CI_METHOD = "percentile bootstrap over pairs"
LC_METHOD = ("logistic regression (scikit-learn, unpenalised) of the per-order outcome (tuned win 1, loss 0, "
             "tie 1/2 on each) on tanh(length difference / its sd) plus an intercept, predicted at difference 0")


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
    one role included); invalid where either order is invalid (counted, never turned into a tie);
    incomplete where an order is missing (a budget stop). consistent = winner_ab == winner_ba, null unless
    both orders are valid.
    """
    check_judgments(judgments)
    wide = judgments.group_by(KEYS, maintain_order=True).agg(
        [pl.col("winner").filter(pl.col("order") == o).first().alias(f"winner_{o}") for o in ORDERS])
    ab, ba = pl.col("winner_ab"), pl.col("winner_ba")
    both = ab.is_not_null() & ba.is_not_null() & (ab != "invalid") & (ba != "invalid")
    winner = (pl.when((ab == "invalid") | (ba == "invalid")).then(pl.lit("invalid"))
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
    valid = judgments.filter(pl.col("verdict") != "invalid")
    return float((valid["verdict"] == "first").mean()) if valid.height else float("nan")


def judge_rng(seed: int, split: str, comparison: str) -> np.random.Generator:
    """The bootstrap stream of one split and comparison: numpy SeedSequence([seed mod 2^64, crc32(split),
    crc32(comparison), crc32("judge")]); the last key keeps it apart from stats.rng_for's streams."""
    key = [int(seed) % 2**64] + [zlib.crc32(s.encode()) for s in (split, comparison, "judge")]
    return np.random.default_rng(np.random.SeedSequence(key))


def bootstrap_ci(scores: np.ndarray, n_boot: int, alpha: float, rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(scores): pairs resampled with replacement n_boot times, the
    alpha/2 and 1 - alpha/2 quantiles of the resampled means. NaN where n_boot = 0 or there are no scores."""
    scores = np.asarray(scores, dtype=float)
    if n_boot == 0 or scores.size == 0:
        return float("nan"), float("nan")
    means = np.concatenate([counts @ scores / scores.size for counts in resample_counts(scores.size, n_boot, rng)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial test of wins among wins + losses against 1/2 (ties excluded). NaN with no
    decided pair."""
    if wins + losses == 0:
        return float("nan")
    return float(sps.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


def _unpenalised() -> dict:
    # scikit-learn 1.8 deprecated penalty=None in favour of C=inf (removal in 1.10); both mean no penalty.
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return {"C": np.inf} if (major, minor) >= (1, 8) else {"penalty": None}


def lc_win_rate(outcome: np.ndarray, length_diff: np.ndarray) -> tuple[float, str]:
    """Length-controlled win rate in the manner of AlpacaEval 2 (without its instruction-difficulty term):
    (rate, reason), the reason empty when the fit is regular.

    Per valid per-order verdict, outcome y = 1 (tuned wins), 0 (base wins) or 1/2 (tie: one row of each
    outcome, weight 1/2 each) and x = tanh(d / sd(d)), d = length(tuned) - length(base), sd over the same
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
    notes = [f"{int((~ok).sum())} verdict(s) without lengths left out"] if (~ok).any() else []
    y, d = y[ok], d[ok]
    if y.size == 0:
        return float("nan"), "no valid tuned-vs-base verdict with both answers' lengths"
    if np.all(y == 1) or np.all(y == 0):
        return float("nan"), f"every valid verdict is a {'win' if y[0] == 1 else 'loss'} for tuned: no finite fit"
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
            "invalid": int((winner == "invalid").sum()), "incomplete": int((winner == "incomplete").sum())}


def _scores(combined: pl.DataFrame, first_role: str) -> np.ndarray:
    """Per valid pair: 1 where the first role wins, 1/2 for a tie, 0 where the other role wins."""
    valid = combined.filter(~pl.col("winner").is_in(["invalid", "incomplete"]))
    return np.where(valid["winner"] == first_role, 1.0, np.where(valid["winner"] == "tie", 0.5, 0.0))


def comparison_summary(judgments: pl.DataFrame, comparison: str, diffs: pl.DataFrame | None, *, seed: int,
                       n_boot: int, alpha: float) -> dict:
    """The summary block of one split and comparison (judgments already filtered to them)."""
    split = judgments["split"][0]
    combined = combine_orders(judgments)
    roles = ROLES[comparison]
    counts, scores = _counts(combined, roles), _scores(combined, roles[0])
    rate = float(scores.mean()) if scores.size else float("nan")
    low, high = bootstrap_ci(scores, n_boot, alpha, judge_rng(seed, split, comparison))
    common = {"ci_low": low, "ci_high": high, "position_consistency": position_consistency(combined),
              "first_position_rate": first_position_rate(judgments),
              "invalid": counts["invalid"], "incomplete": counts["incomplete"]}
    if comparison == "chosen_vs_rejected":
        return {"n": counts["n"], "agreement": rate, **common}
    lc, why = split_lc_win_rate(judgments, diffs)
    return {"n": counts["n"], "wins": counts["wins"], "losses": counts["losses"], "ties": counts["ties"],
            "win_rate": rate, **common, "p_value": sign_test(counts["wins"], counts["losses"]),
            "sign_test": SIGN_TEST, "lc_win_rate": lc, "lc_reason": why}


def split_lc_win_rate(judgments: pl.DataFrame, diffs: pl.DataFrame | None) -> tuple[float, str]:
    """lc_win_rate over the valid tuned-vs-base per-order verdicts of one split, lengths joined by pair."""
    if diffs is None:
        return float("nan"), "no answer lengths given"
    rows = judgments.filter(pl.col("verdict") != "invalid").join(diffs, on=["pair_id", "split"], how="left")
    outcome = np.where(rows["winner"] == "tuned", 1.0, np.where(rows["winner"] == "tie", 0.5, 0.0))
    return lc_win_rate(outcome, rows["length_diff"].to_numpy().astype(float))


def judge_summary(judgments: pl.DataFrame, lengths: pl.DataFrame | None = None, *, seed: int = 0,
                  n_boot: int = 2000, alpha: float = 0.05) -> dict:
    """`summary.json`'s judge statistics for one judge: {invalid, incomplete, ci_method, lc_method, splits:
    {split: {comparison: block}}}, comparisons present in the table only.

    tuned_vs_base: n (valid pairs), wins, losses, ties, win_rate = (wins + ties/2) / n, its bootstrap CI
    (ci_low, ci_high at level 1 - alpha, seeded per split and comparison), p_value (sign test, ties
    excluded), lc_win_rate (lc_win_rate; NaN with lc_reason), position_consistency, first_position_rate.
    chosen_vs_rejected: n, agreement = (#chosen + #ties/2) / n with its CI, position_consistency,
    first_position_rate. Both carry invalid (pairs with an invalid verdict, outside n) and incomplete
    (pairs missing an order, outside n). Top-level invalid counts invalid per-order verdicts.
    """
    check_judgments(judgments)
    judges = judgments["judge"].unique().to_list()
    if len(judges) > 1:
        raise DpoEvalError(f"judgments hold several judges {sorted(judges)}: summarise one judge at a time")
    diffs = length_differences(lengths) if lengths is not None else None
    splits: dict = {}
    for (split, comparison), part in judgments.sort("split", "comparison").group_by(
            ["split", "comparison"], maintain_order=True):
        splits.setdefault(split, {})[comparison] = comparison_summary(
            part, comparison, diffs, seed=seed, n_boot=n_boot, alpha=alpha)
    incomplete = sum(block["incomplete"] for blocks in splits.values() for block in blocks.values())
    return {"invalid": int((judgments["verdict"] == "invalid").sum()), "incomplete": incomplete,
            "ci_method": f"{CI_METHOD}, {n_boot} resamples, level {1 - alpha:g}", "lc_method": LC_METHOD,
            "splits": splits}
