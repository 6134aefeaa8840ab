"""Tuned-vs-base feature tests per turn and per category (two-turn prompt sets, pairs.parquet's `category`).

Per turn, the feature tests are the study's own (stats.analysis.run_analysis on that turn's features: turn 1 is
the run's stats.parquet). Per turn, split and category, each feature's d_tb = tuned - base (one pair per prompt,
the smallest pair_id; a record without the feature's value dropped for that feature) gets a two-sided Wilcoxon
signed-rank test (stats.paired.wilcoxon, scipy's) where at least MIN_PROMPTS values remain, and p_adjusted is
Benjamini-Hochberg across the categories tested for that turn, split and feature
(scipy.stats.false_discovery_control); a category with fewer values is listed, untested, with its reason. Splits
are never pooled (a labelled set's train and valid prompts are tested apart).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats as sps

from dpo_eval.config import AnalysisSpec
from dpo_eval.stats.analysis import feature_columns, run_analysis
from dpo_eval.stats.paired import wilcoxon

MIN_PROMPTS = 6  # below this a Wilcoxon test's smallest two-sided p (2 / 2^n) cannot reach 0.05
CATEGORY_SCHEMA = {"turn": pl.Int64, "split": pl.String, "category": pl.String, "feature": pl.String, "n": pl.Int64,
                   "mean_delta": pl.Float64, "wilcoxon_stat": pl.Float64, "p_value": pl.Float64,
                   "p_adjusted": pl.Float64, "reason": pl.String}


def tuned_minus_base(features: pl.DataFrame) -> pl.DataFrame:
    """pair_id, split and d_tb per feature, one pair per prompt (the smallest pair_id of each prompt_id)."""
    names = feature_columns(features)
    keys = ["pair_id", "split"] + (["prompt_id"] if "prompt_id" in features.columns else [])
    tuned = features.filter(pl.col("role") == "tuned").select(*keys, *names)
    base = features.filter(pl.col("role") == "base").select("pair_id", *names)
    both = tuned.join(base, on="pair_id", suffix="__base")
    if "prompt_id" in both.columns:
        both = both.sort("pair_id").unique("prompt_id", keep="first", maintain_order=True)
    return both.select("pair_id", "split", *[(pl.col(f).cast(pl.Float64) - pl.col(f"{f}__base").cast(pl.Float64))
                                             .alias(f) for f in names])


def category_tests(features: pl.DataFrame, categories: pl.DataFrame, turn: int, alpha: float = 0.05,
                   min_prompts: int = MIN_PROMPTS) -> pl.DataFrame:
    """CATEGORY_SCHEMA rows of one turn's features (module docstring); `categories` is pair_id, category."""
    deltas = tuned_minus_base(features).join(categories, on="pair_id", how="left").with_columns(
        pl.col("category").fill_null("(none)"))
    names = [c for c in deltas.columns if c not in ("pair_id", "split", "category")]
    rows = []
    for (split, name), part in sorted(deltas.group_by("split", "category"), key=lambda item: item[0]):
        for feature in names:
            d = part[feature].to_numpy().astype(float)
            d = d[np.isfinite(d)]
            if d.size < min_prompts:
                stat, p, why = np.nan, np.nan, f"{d.size} prompts with a value, fewer than {min_prompts}: not tested"
            else:
                stat, p, why = wilcoxon(d, alpha)
            rows.append({"turn": turn, "split": split, "category": name, "feature": feature, "n": int(d.size),
                         "mean_delta": float(d.mean()) if d.size else np.nan, "wilcoxon_stat": stat, "p_value": p,
                         "p_adjusted": np.nan, "reason": why})
    table = pl.DataFrame(rows, schema=CATEGORY_SCHEMA)
    parts = []
    for _, part in table.group_by("split", "feature", maintain_order=True):
        p = part["p_value"].to_numpy().astype(float)
        q = np.full(p.shape, np.nan)
        ok = np.isfinite(p)
        if ok.any():
            q[ok] = sps.false_discovery_control(p[ok], method="bh")
        parts.append(part.with_columns(pl.Series("p_adjusted", q)))
    return pl.concat(parts).sort("split", "category", "feature") if parts else table


def category_summary(table: pl.DataFrame, alpha: float) -> dict:
    """{turn: {split: {category: {n, tested, significant}}}}: prompts, whether tested, features with p_adjusted <
    alpha."""
    out: dict = {}
    for (turn, split, name), part in table.group_by("turn", "split", "category", maintain_order=True):
        out.setdefault(str(turn), {}).setdefault(split, {})[name] = {
            "n": int(part["n"].max() or 0), "tested": bool(part["p_value"].is_not_nan().any()),
            "significant": int((part["p_adjusted"].fill_nan(1.0) < alpha).sum())}
    return out


def turn_tests(features_by_turn: dict[int, pl.DataFrame], spec: AnalysisSpec,
               main: pl.DataFrame | None = None) -> tuple[pl.DataFrame, dict]:
    """(tuned-vs-base stats rows with `turn`, {turn: {n, significant}}): turn 1's rows are `main` where given (the
    run's own analysis), every other turn's from run_analysis of its features."""
    rows, summary = [], {}
    for turn, features in sorted(features_by_turn.items()):
        stats = main if turn == 1 and main is not None else run_analysis(features, spec).stats
        tb = stats.filter(pl.col("comparison") == "tuned_vs_base").with_columns(pl.lit(turn, dtype=pl.Int64)
                                                                                 .alias("turn"))
        rows.append(tb)
        summary[str(turn)] = {split: {"n": int(part["n"].max() or 0),
                                      "significant": int((part["q_value"].fill_nan(1.0) < spec.alpha).sum())}
                              for (split,), part in tb.group_by("split", maintain_order=True)
                              if (part["n"].max() or 0) > 0}  # a split without prompts (a prompt set's train)
    return pl.concat(rows, how="diagonal_relaxed"), summary
