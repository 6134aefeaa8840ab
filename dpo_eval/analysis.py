"""Paired statistics: does tuned-vs-base move the way chosen-vs-rejected does, feature by feature?

The study's method, exactly (design.md): per feature j, records with any of the four values NaN or
missing are dropped for j only; d_cr = chosen - rejected, d_tb = tuned - base; the scale S_j is the
sample standard deviation (ddof=1) of d_cr over the train split, used for every split and both
comparisons; norm_mean_delta = mean(d) / S_j; sign_agreement = sign(mean d_cr) * sign(mean d_tb);
p_value is the two-sided Wilcoxon signed-rank test of d (scipy.stats.wilcoxon).

Beyond it: BH q-values per comparison and split, the matched-pairs rank-biserial effect size, a
seeded bootstrap CI of norm_mean_delta, a pair-level sign-flip permutation test that sign agreement
beats chance, and length-adjusted deltas (the intercept of d_j regressed on the n_tokens delta).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
from dpo_eval.config import AnalysisSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.features import FAMILY_OF, LENGTH_FEATURE
from dpo_eval.stats import (benjamini_hochberg, bootstrap_means, intercept_at_zero, rank_biserial,
                            sign_flip_means, wilcoxon)

META = ("pair_id", "split", "role")
ROLES = ("chosen", "rejected", "base", "tuned")
COMPARISONS = {"chosen_vs_rejected": ("chosen", "rejected"), "tuned_vs_base": ("tuned", "base")}
SIGN_TEST = "pair-level sign-flip permutation test, one-sided (agreement greater than chance)"


@dataclass
class Analysis:
    stats: pl.DataFrame
    summary: dict


def analyze(features: pl.DataFrame, spec: AnalysisSpec | None = None) -> pl.DataFrame:
    """The stats table: one row per feature x split x comparison (see the module docstring)."""
    return run_analysis(features, spec).stats


def feature_columns(features: pl.DataFrame) -> list[str]:
    """Numeric columns other than the keys (a Boolean flag such as `truncated` is not a feature)."""
    return [c for c, t in features.schema.items() if c not in META and t.is_numeric()]


def run_analysis(features: pl.DataFrame, spec: AnalysisSpec | None = None) -> Analysis:
    """The stats table and the summary of design.md."""
    spec = spec or AnalysisSpec()
    names = feature_columns(features)
    splits, values = _wide(features, names)
    rng = np.random.default_rng(spec.seed)
    cr = values["chosen"] - values["rejected"]
    tb = values["tuned"] - values["base"]
    valid = np.all([np.isfinite(values[r]) for r in ROLES], axis=0)
    train = splits == "train"
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.array([np.std(cr[train & valid[:, j], j], ddof=1) if (train & valid[:, j]).sum() > 1
                          else np.nan for j in range(len(names))])
    length = names.index(LENGTH_FEATURE) if LENGTH_FEATURE in names else None
    rows, summary_parts = [], {}
    for split in _split_order(splits):
        in_split = splits == split
        deltas = {"chosen_vs_rejected": cr[in_split], "tuned_vs_base": tb[in_split]}
        ok = valid[in_split]
        means = {c: _masked_mean(d, ok) for c, d in deltas.items()}
        agreement = np.sign(means["chosen_vs_rejected"]) * np.sign(means["tuned_vs_base"])
        summary_parts[split] = (int(in_split.sum()), agreement,
                                _sign_agreement_p(means, deltas["tuned_vs_base"], ok, spec, rng))
        for comparison, d in deltas.items():
            ci = _bootstrap_ci(d, ok, scale, spec, rng)
            block = _comparison_rows(names, split, comparison, d, ok, scale, means[comparison],
                                     agreement, ci, length)
            rows.extend(block)
    stats = _finish(pl.DataFrame(rows, infer_schema_length=None))
    return Analysis(stats, _summary(stats, summary_parts, len(names), spec))


def _wide(features: pl.DataFrame, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    missing = [c for c in ("pair_id", "split", "role") if c not in features.columns]
    if missing:
        raise DpoEvalError(f"features table lacks the columns {missing}; expected pair_id, split, role "
                           "and one float column per feature (features.parquet of design.md)")
    if not names:
        raise DpoEvalError("features table has no numeric feature columns")
    unknown = set(features["role"].unique().to_list()) - set(ROLES)
    if unknown:
        raise DpoEvalError(f"features table: unknown roles {sorted(unknown)}; use {list(ROLES)}")
    if features.select("pair_id", "role").is_duplicated().any():
        raise DpoEvalError("features table: a (pair_id, role) appears twice; each pair needs one row per role")
    keys = features.select("pair_id", "split").unique(maintain_order=True)
    if keys["pair_id"].is_duplicated().any():
        raise DpoEvalError("features table: a pair_id appears in two splits")
    values = {}
    for role in ROLES:
        part = features.filter(pl.col("role") == role).select(["pair_id"] + names)
        joined = keys.join(part, on="pair_id", how="left", maintain_order="left")
        values[role] = joined.select(names).cast(pl.Float64).fill_null(np.nan).to_numpy()
    return keys["split"].to_numpy().astype(str), values


def _split_order(splits: np.ndarray) -> list[str]:
    present = set(splits.tolist())
    return ["train", "valid"] + sorted(present - {"train", "valid"})


def _masked_mean(d: np.ndarray, ok: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, d, 0.0).sum(axis=0) / ok.sum(axis=0)


def _bootstrap_ci(d, ok, scale, spec: AnalysisSpec, rng) -> tuple[np.ndarray, np.ndarray]:
    if spec.bootstrap == 0 or d.shape[0] == 0:
        nan = np.full(d.shape[1], np.nan)
        return nan, nan
    means = bootstrap_means(d, ok, spec.bootstrap, rng)
    tail = (1 - spec.ci_level) / 2 * 100
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        lo, hi = np.nanpercentile(means, [tail, 100 - tail], axis=0) if np.isfinite(means).any() \
            else (np.full(d.shape[1], np.nan),) * 2
        return lo / scale, hi / scale


def _sign_agreement_p(means, tb, ok, spec: AnalysisSpec, rng) -> float:
    """P(agreement >= observed) when each pair's tuned-base deltas flip sign at random (one-sided)."""
    direction = np.sign(means["chosen_vs_rejected"])
    used = np.isfinite(means["tuned_vs_base"]) & (direction != 0) & np.isfinite(direction)
    if spec.permutations == 0 or not used.any():
        return float("nan")
    used &= np.sign(means["tuned_vs_base"]) != 0  # as the reported share: both mean deltas nonzero
    if not used.any():
        return float("nan")
    observed = np.mean(direction[used] * np.sign(means["tuned_vs_base"][used]) == 1)
    flipped = sign_flip_means(tb[:, used], ok[:, used], spec.permutations, rng)
    null = np.mean(direction[used] * np.sign(flipped) == 1, axis=1)
    return float((1 + np.sum(null >= observed)) / (1 + spec.permutations))


def _comparison_rows(names, split, comparison, d, ok, scale, mean, agreement, ci, length) -> list[dict]:
    rows = []
    for j, name in enumerate(names):
        dj = d[ok[:, j], j]
        reasons = []
        if dj.size == 0:
            reasons.append("no records")
        if not np.isfinite(scale[j]):
            reasons.append("fewer than 2 train records: no scale")
        elif scale[j] == 0:
            reasons.append("zero scale: chosen and rejected never differ on train")
        stat, p, why = wilcoxon(dj)
        adjusted, adjusted_p, why_len = _length_adjusted(d, ok, j, length)
        reasons += [r for r in (why, why_len) if r and r not in reasons]
        usable_scale = scale[j] if np.isfinite(scale[j]) and scale[j] > 0 else np.nan
        rows.append({
            "feature": name, "family": FAMILY_OF.get(name, "other"), "split": split,
            "comparison": comparison, "n": int(dj.size), "mean_delta": float(mean[j]),
            "norm_mean_delta": float(mean[j] / usable_scale), "scale": float(scale[j]),
            "ci_low": float(ci[0][j]) if np.isfinite(usable_scale) else np.nan,
            "ci_high": float(ci[1][j]) if np.isfinite(usable_scale) else np.nan,
            "wilcoxon_stat": stat, "p_value": p, "effect_size": rank_biserial(dj),
            "sign_agreement": float(agreement[j]),
            "length_adjusted_delta": adjusted, "length_adjusted_norm_delta": adjusted / usable_scale,
            "length_adjusted_p": adjusted_p, "reason": "; ".join(reasons),
        })
    return rows


def _length_adjusted(d, ok, j, length) -> tuple[float, float, str]:
    if length is None:
        return np.nan, np.nan, f"no {LENGTH_FEATURE} feature for length control"
    if j == length:
        return np.nan, np.nan, ""
    both = ok[:, j] & ok[:, length]
    return intercept_at_zero(d[both, j], d[both, length])


def _finish(stats: pl.DataFrame) -> pl.DataFrame:
    """Add BH q-values per comparison x split, with NaN (not null) for undefined numbers."""
    floats = [c for c, t in stats.schema.items() if t in (pl.Float64, pl.Int64) and c != "n"]
    stats = stats.with_columns([pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in floats])
    q = np.full(stats.height, np.nan)
    groups = stats.with_row_index().group_by("comparison", "split").agg(pl.col("index"))
    for idx in groups["index"].to_list():
        q[idx] = benjamini_hochberg(stats["p_value"].to_numpy()[idx])
    stats = stats.with_columns(pl.Series("q_value", q))
    order = ["feature", "family", "split", "comparison", "n", "mean_delta", "norm_mean_delta", "scale",
             "ci_low", "ci_high", "wilcoxon_stat", "p_value", "q_value", "effect_size", "sign_agreement",
             "length_adjusted_delta", "length_adjusted_norm_delta", "length_adjusted_p", "reason"]
    return stats.select(order)


def _summary(stats: pl.DataFrame, parts: dict, n_features: int, spec: AnalysisSpec) -> dict:
    significant = {c: {} for c in COMPARISONS}
    toward_chosen, agreement_share, agreement_p, n_pairs, n_signed = {}, {}, {}, {}, {}
    for split, (n, agreement, p) in parts.items():
        n_pairs[split] = n
        signed = agreement[np.isfinite(agreement) & (agreement != 0)]  # both mean deltas nonzero
        agreement_share[split] = float(np.mean(signed == 1)) if signed.size else float("nan")
        n_signed[split] = int(signed.size)
        agreement_p[split] = p
        for comparison in COMPARISONS:
            rows = stats.filter((pl.col("split") == split) & (pl.col("comparison") == comparison))
            significant[comparison][split] = int((rows["q_value"] < spec.alpha).sum())
        tuned = stats.filter((pl.col("split") == split) & (pl.col("comparison") == "tuned_vs_base")
                             & (pl.col("q_value") < spec.alpha))
        toward_chosen[split] = int((tuned["sign_agreement"] == 1).sum())
    return {"n_pairs": n_pairs, "n_features": n_features, "alpha": spec.alpha,
            "sign_agreement": agreement_share, "sign_agreement_features": n_signed,
            "sign_agreement_p": agreement_p,
            "sign_agreement_test": f"{SIGN_TEST}, {spec.permutations} permutations",
            "significant": significant, "significant_toward_chosen": toward_chosen}
