"""The judge's tuned-vs-base win rate per category (pairs.parquet's `category`), and per turn of a two-turn set.

Per category, over the category's valid pairs (both orders combined as the overall win rate combines them, one
pair per prompt): n, wins, losses, ties, win_rate = (wins + ties / 2) / n with its Wilson interval at level
1 - alpha (as the overall rate), p_value the two-sided exact binomial test of wins among wins + losses against 1/2
(ties excluded: scipy.stats.binomtest, as the overall sign test), and p_adjusted, Benjamini-Hochberg across the
categories of the split (scipy.stats.false_discovery_control; a category without a decided pair has no p and is
outside the family).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats as sps

from dpo_eval.data.pairs import one_pair_per_prompt
from dpo_eval.data.prompt_sets import CATEGORY, TURN
from dpo_eval.judges.statistics import combine_orders, sign_test
from dpo_eval.stats.paired import wilson

NO_CATEGORY = "(none)"


def bh(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values of the finite entries (NaN stays NaN and is outside the family)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = sps.false_discovery_control(p[ok], method="bh")
    return out.tolist()


def category_rates(judgments: pl.DataFrame, categories: pl.DataFrame, prompts: pl.DataFrame | None = None,
                   alpha: float = 0.05) -> dict:
    """{category: {n, wins, losses, ties, win_rate, ci_low, ci_high, p_value, p_adjusted}} of tuned vs base in
    `judgments` (one split, one turn); `categories` is pair_id, category (null: NO_CATEGORY)."""
    tb = one_pair_per_prompt(judgments.filter(pl.col("comparison") == "tuned_vs_base"), prompts)
    if tb.height == 0:
        return {}
    combined = combine_orders(tb).join(categories, on="pair_id", how="left").with_columns(
        pl.col(CATEGORY).fill_null(NO_CATEGORY))
    out = {}
    for name in sorted(combined[CATEGORY].unique().to_list()):
        winner = combined.filter(pl.col(CATEGORY) == name)["winner"]
        wins, losses, ties = int((winner == "tuned").sum()), int((winner == "base").sum()), int((winner == "tie").sum())
        n = wins + losses + ties
        low, high = wilson(wins + ties / 2, n, 1 - alpha)
        out[name] = {"n": n, "wins": wins, "losses": losses, "ties": ties,
                     "win_rate": (wins + ties / 2) / n if n else float("nan"), "ci_low": low, "ci_high": high,
                     "p_value": sign_test(wins, losses)}
    for name, q in zip(out, bh([b["p_value"] for b in out.values()])):
        out[name]["p_adjusted"] = q
    return out


def add_categories(block: dict, judgments: pl.DataFrame, pairs: pl.DataFrame, prompts: pl.DataFrame | None,
                   alpha: float = 0.05) -> None:
    """Set `categories` in each split's tuned_vs_base block of `block` (a judge_summary `splits` holder) where
    pairs.parquet has a category column."""
    if CATEGORY not in pairs.columns:
        return
    categories = pairs.select("pair_id", CATEGORY)
    for split, comparisons in (block.get("splits") or {}).items():
        if "tuned_vs_base" in comparisons:
            comparisons["tuned_vs_base"]["categories"] = category_rates(
                judgments.filter(pl.col("split") == split), categories, prompts, alpha)


def turn_blocks(table: pl.DataFrame, summarise, pairs: pl.DataFrame, prompts: pl.DataFrame | None,
                alpha: float = 0.05) -> dict:
    """{turn: {splits: ...}} of a judgments table with a `turn` column: `summarise(turn's rows)` (judge_summary
    with the caller's lengths), with categories per split."""
    out = {}
    for turn in sorted(table[TURN].unique().to_list()):
        part = table.filter(pl.col(TURN) == turn).drop(TURN)
        stats = summarise(part, turn)
        block = {"splits": stats["splits"]}
        add_categories(block, part, pairs, prompts, alpha)
        out[str(turn)] = block
    return out
