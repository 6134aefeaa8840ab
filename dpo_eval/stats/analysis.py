"""Paired statistics: does tuned-vs-base move the way chosen-vs-rejected does, feature by feature?

The study's method, exactly (design.md): per feature j, records with any of the four values NaN or
missing are dropped for j only (+/-inf too, counted apart: reason and summary["dropped_inf"]);
d_cr = chosen - rejected, d_tb = tuned - base; the scale S_j is the sample standard deviation
(ddof=1) of d_cr over the train split, used for every split and both comparisons (with no train
split at all, the valid split's own, as summary["scale_source"] says); norm_mean_delta = mean(d) / S_j;
sign_agreement = sign(mean d_cr) * sign(mean d_tb), NaN where either comparison has no test (no
records, or all deltas zero); p_value is the two-sided Wilcoxon signed-rank test of d (scipy.stats.wilcoxon).

Beyond it: BH q-values over the features of one comparison and split (column q_family), the
matched-pairs rank-biserial effect size, a seeded bootstrap CI of norm_mean_delta, a prompt-level
sign-flip permutation test that sign agreement beats chance, length-adjusted deltas (the intercept of
d_j regressed on the n_tokens delta), and the Wilcoxon test's power to find a shift of 0.5 S per split.
Every random draw comes from its own stream per split and purpose (stats.rng_for); both comparisons
of a split start from the same stream (where every prompt has one pair, they resample the same records).

The unit of each comparison. Tuned and base answer a prompt (system and turns: features.parquet's prompt_id,
data.pairs.prompt_id), not a pair: the pairs of one prompt share their answers (generation.generate), so
tuned vs base counts each distinct prompt once per split. Its delta d_tb of a prompt is the mean over the
prompt's pairs valid for feature j (the same value where the answers are shared: that value exactly), a
prompt valid for j where any of its pairs is; n, mean_delta, norm_mean_delta, the bootstrap CI (prompts
resampled), the Wilcoxon test, the effect size and the length-adjusted delta (the prompt's d_tb regressed on
its own n_tokens d_tb) of tuned_vs_base rows are over these prompts, and so are the sign-flip test (each
prompt's row flipped), the power (its n: the tuned-vs-base test's) and length_sign_share. Chosen vs rejected
stays per pair (each pair has its own chosen and rejected texts): S_j, its rows and the direction
sign(mean d_cr) are over pairs. Sign agreement is sign(mean d_cr over pairs) * sign(mean d_tb over prompts),
the product of the signs of the two rows' own mean_delta. summary["n_pairs"] counts pairs and
summary["n_prompts"] prompts, per split. A features table without prompt_id (one written before it, or
another tool's) counts each pair as its own prompt.

Without labels (questions only: features hold base and tuned rows, no chosen or rejected), tuned vs
base is tested as above, and chosen vs rejected comes from a reference data set when one is given
(the preference data the checkpoint was trained on, its chosen and rejected rows): S_j is the std of
its d_cr over its train split (its valid split where it has no train split), the direction is
sign(mean d_cr) over the same rows, and the chosen_vs_rejected rows of every split are that reference
sample's statistics, the same on every split (their bootstrap has its own stream). Without a reference
there is no scale and no direction: norm_mean_delta and sign agreement are NaN, and each row says why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl

from dpo_eval.config import AnalysisSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.scoring.features import FEATURE_FAMILY, LENGTH_FEATURE
from dpo_eval.stats.paired import (
    benjamini_hochberg,
    bootstrap_means,
    intercept_at_zero,
    mean_signs,
    rank_biserial,
    rng_for,
    sign_agreement_test,
    wilcoxon,
    wilcoxon_power,
)

META = ("pair_id", "split", "role")
PROMPT_ID = "prompt_id"  # features.parquet: the prompt of a pair (data.pairs.prompt_id), the unit of tuned vs base
ROLES = ("chosen", "rejected", "base", "tuned")
COMPARISONS = {"chosen_vs_rejected": ("chosen", "rejected"), "tuned_vs_base": ("tuned", "base")}
SIGN_TEST = ("prompt-level sign-flip permutation test (each prompt's tuned-base deltas flipped together), one-sided "
             "(agreement greater than chance); features whose mean tuned-base delta is 0 are left out, in the "
             "observed share and in every flip")
Q_FAMILY = "Benjamini-Hochberg over the features of one comparison and split (NaN p-values left out)"
POWER_SHIFT = 0.5
POWER_METHOD = ("two-sided Wilcoxon signed-rank test at alpha for a mean shift of 0.5 S with n records (the "
                "tuned-vs-base test's: distinct prompts), normal "
                "deltas of sd S: the paired t-test's power (noncentral t) at n * 3/pi pairs (the Wilcoxon "
                "test's asymptotic relative efficiency); 0 where the exact test cannot reach alpha")


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


def has_labels(features: pl.DataFrame) -> bool:
    """Whether a features table has chosen or rejected rows (a data set of questions only has neither)."""
    return "role" in features.columns and bool(features["role"].is_in(["chosen", "rejected"]).any())


def run_analysis(features: pl.DataFrame, spec: AnalysisSpec | None = None,
                 reference: pl.DataFrame | None = None) -> Analysis:
    """The stats table and the summary of design.md; `reference` (chosen and rejected rows of a reference
    data set, features.parquet's shape) only for a features table without labels."""
    spec = spec or AnalysisSpec()
    names = feature_columns(features)
    splits, values, prompts = _wide(features, names)
    if not has_labels(features):
        return _run_unlabeled(names, splits, values, prompts, spec, reference)
    if reference is not None:
        raise DpoEvalError("a reference data set is for questions without labels; this data set has chosen and "
                           "rejected answers, which give the direction and the scale themselves")
    cr = values["chosen"] - values["rejected"]
    tb = values["tuned"] - values["base"]
    with np.errstate(invalid="ignore"):
        finite = np.all([np.isfinite(values[r]) for r in ROLES], axis=0) & np.isfinite(cr) & np.isfinite(tb)
        infinite = ~finite & ~np.any([np.isnan(values[r]) for r in ROLES], axis=0)  # +/-inf, or a delta overflows
    scale, scale_source = _scale(cr, finite, splits)
    length = names.index(LENGTH_FEATURE) if LENGTH_FEATURE in names else None
    rows, parts = [], {}
    for split in _split_order(splits):
        in_split = splits == split
        ok = finite[in_split]
        # chosen vs rejected per pair, tuned vs base per prompt (module docstring)
        deltas = {"chosen_vs_rejected": (cr[in_split], ok),
                  "tuned_vs_base": _per_prompt(tb[in_split], ok, prompts[in_split])}
        signs = {c: _signs(d, o) for c, (d, o) in deltas.items()}
        tested = {c: (np.where(o, d, 0.0) != 0).any(axis=0) for c, (d, o) in deltas.items()}
        both = tested["chosen_vs_rejected"] & tested["tuned_vs_base"]
        agreement = np.where(both, signs["chosen_vs_rejected"] * signs["tuned_vs_base"], np.nan)
        tb_d, tb_ok = deltas["tuned_vs_base"]
        _, p, _ = sign_agreement_test(np.where(both, signs["chosen_vs_rejected"], np.nan), tb_d, tb_ok,
                                      spec.permutations, rng_for(spec.seed, split, "permutations"))
        parts[split] = {"n": int(in_split.sum()), "n_prompts": int(tb_d.shape[0]), "agreement": agreement, "p": p,
                        "inf": infinite[in_split].sum(axis=0),
                        "length": tb_d[tb_ok[:, length], length] if length is not None else None}
        for comparison, (d, o) in deltas.items():
            # a fresh copy of the split's bootstrap stream: with one pair per prompt both resample the same records
            ci = _bootstrap_ci(d, o, scale, spec, rng_for(spec.seed, split, "bootstrap"))
            other = next(c for c in COMPARISONS if c != comparison)
            rows += _comparison_rows(names, split, comparison, d, o, scale, agreement, ci, length, spec,
                                     parts[split]["inf"], tested[comparison], tested[other], other)
    stats = _finish(pl.DataFrame(rows, infer_schema_length=None))
    labels = {"source": "data set", "note": "chosen and rejected of each split's own pairs"}
    return Analysis(stats, _summary(stats, parts, names, spec, scale_source) | {"labels": labels})


NO_LABELS = ("no chosen/rejected labels in this data set and no reference data set: no direction and no scale "
             "(pass --reference-dataset, the preference data the checkpoint was trained on)")


def _run_unlabeled(names, splits, values, prompts, spec: AnalysisSpec, reference: pl.DataFrame | None) -> Analysis:
    """Tuned vs base (per prompt) on questions without labels; chosen vs rejected (per pair) from `reference`
    (module docstring)."""
    tb = values["tuned"] - values["base"]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values["tuned"]) & np.isfinite(values["base"]) & np.isfinite(tb)
        infinite = ~ok & ~(np.isnan(values["tuned"]) | np.isnan(values["base"]))
    width = len(names)
    if reference is not None:
        if not has_labels(reference):
            raise DpoEvalError("the reference data set has no chosen or rejected rows: it cannot give a direction")
        missing = [n for n in names if n not in reference.columns]
        if missing:
            raise DpoEvalError(f"the reference features lack {missing[:5]}{'...' * (len(missing) > 5)}; score the "
                               "reference data set with the same features")
        ref_splits, ref, _ = _wide(reference.select("pair_id", "split", "role", *names), names)
        cr_all = ref["chosen"] - ref["rejected"]
        with np.errstate(invalid="ignore"):
            ref_ok = np.isfinite(ref["chosen"]) & np.isfinite(ref["rejected"]) & np.isfinite(cr_all)
        scale, source = _scale(cr_all, ref_ok, ref_splits)
        used = "train" if (ref_splits == "train").any() else "valid"
        cr, cr_ok = cr_all[ref_splits == used], ref_ok[ref_splits == used]
        scale_source = f"the reference data set: {source}"
        note = (f"chosen vs rejected of the reference data set's {used} split ({cr.shape[0]} pairs), the same rows "
                "on every split")
        labels = {"source": "reference", "reference_split": used, "reference_pairs": int(cr.shape[0]), "note": note}
    else:
        cr, cr_ok = np.zeros((0, width)), np.zeros((0, width), dtype=bool)
        scale, scale_source, note = np.full(width, np.nan), "none (no labels and no reference data set)", NO_LABELS
        labels = {"source": "none", "note": NO_LABELS}
    direction = _signs(cr, cr_ok)
    cr_tested = (np.where(cr_ok, cr, 0.0) != 0).any(axis=0)
    cr_ci = _bootstrap_ci(cr, cr_ok, scale, spec, rng_for(spec.seed, "reference", "bootstrap"))
    length = names.index(LENGTH_FEATURE) if LENGTH_FEATURE in names else None
    rows, parts = [], {}
    for split in _split_order(splits):
        in_split = splits == split
        d, o = _per_prompt(tb[in_split], ok[in_split], prompts[in_split])
        tested = (np.where(o, d, 0.0) != 0).any(axis=0)
        both = tested & cr_tested
        agreement = np.where(both, direction * _signs(d, o), np.nan)
        _, p, _ = sign_agreement_test(np.where(both, direction, np.nan), d, o, spec.permutations,
                                      rng_for(spec.seed, split, "permutations"))
        parts[split] = {"n": int(in_split.sum()), "n_prompts": int(d.shape[0]), "agreement": agreement, "p": p,
                        "inf": infinite[in_split].sum(axis=0),
                        "length": d[o[:, length], length] if length is not None else None}
        ci = _bootstrap_ci(d, o, scale, spec, rng_for(spec.seed, split, "bootstrap"))
        rows += _comparison_rows(names, split, "tuned_vs_base", d, o, scale, agreement, ci, length, spec,
                                 parts[split]["inf"], tested, cr_tested, "chosen_vs_rejected")
        for row in _comparison_rows(names, split, "chosen_vs_rejected", cr, cr_ok, scale, agreement, cr_ci, length,
                                    spec, np.zeros(width, dtype=int), cr_tested, tested, "tuned_vs_base"):
            rows.append(row | {"reason": "; ".join(r for r in (note, row["reason"]) if r)})
    stats = _finish(pl.DataFrame(rows, infer_schema_length=None))
    return Analysis(stats, _summary(stats, parts, names, spec, scale_source) | {"labels": labels})


def _wide(features: pl.DataFrame, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(split, {role: values (n x F)}, prompt) per pair; a pair's prompt is its prompt_id, or its pair_id
    where the table has no prompt_id (or the pair has none)."""
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
    prompts = keys["pair_id"]
    if PROMPT_ID in features.columns:
        given = features.filter(pl.col(PROMPT_ID).is_not_null()).select("pair_id", pl.col(PROMPT_ID).cast(pl.String))
        given = given.unique(maintain_order=True)
        if given["pair_id"].is_duplicated().any():
            raise DpoEvalError(f"features table: a pair_id has two {PROMPT_ID}s; a pair has one prompt")
        prompts = keys.join(given, on="pair_id", how="left", maintain_order="left").select(
            pl.col(PROMPT_ID).fill_null(pl.col("pair_id")))[PROMPT_ID]
    values = {}
    for role in ROLES:
        part = features.filter(pl.col("role") == role).select(["pair_id"] + names)
        joined = keys.join(part, on="pair_id", how="left", maintain_order="left")
        values[role] = joined.select(names).cast(pl.Float64).fill_null(np.nan).to_numpy()
    return keys["split"].to_numpy().astype(str), values, prompts.to_numpy().astype(str)


def _per_prompt(d: np.ndarray, ok: np.ndarray, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One delta per distinct prompt (in order of first appearance) from per-pair deltas `d` (n x F): per
    feature, the mean over the prompt's pairs valid for it (`ok`), exactly their common value where those are
    all equal (shared answers); the prompt valid where any of its pairs is. Distinct prompts give d and ok back."""
    order = list(dict.fromkeys(prompts.tolist()))
    if len(order) == d.shape[0]:
        return d, ok
    where = {p: k for k, p in enumerate(order)}
    group = np.array([where[p] for p in prompts.tolist()], dtype=int)
    shape = (len(order), d.shape[1])
    sums, counts = np.zeros(shape), np.zeros(shape)
    low, high = np.full(shape, np.inf), np.full(shape, -np.inf)
    np.add.at(sums, group, np.where(ok, d, 0.0))
    np.add.at(counts, group, ok.astype(float))
    np.minimum.at(low, group, np.where(ok, d, np.inf))
    np.maximum.at(high, group, np.where(ok, d, -np.inf))
    valid = counts > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(low == high, low, sums / counts)
    return np.where(valid, mean, np.nan), valid


def _split_order(splits: np.ndarray) -> list[str]:
    present = set(splits.tolist())
    return ["train", "valid"] + sorted(present - {"train", "valid"})


def _scale(cr: np.ndarray, ok: np.ndarray, splits: np.ndarray) -> tuple[np.ndarray, str]:
    """S_j = std(d_cr, ddof=1) over train; with no train pair at all, over valid (and the source says so)."""
    if (splits == "train").any():
        source, text = "train", "train"
    elif (splits == "valid").any():
        source = "valid"
        text = ("valid (no train split: every pair is valid, as when a checkpoint is evaluated on a data set "
                "other than its training set, so S_j is the valid split's own std of chosen - rejected)")
    else:
        return np.full(cr.shape[1], np.nan), "none (no train or valid split)"
    rows = (splits == source)[:, None] & ok
    scale = np.array([np.std(cr[rows[:, j], j], ddof=1) if rows[:, j].sum() > 1 else np.nan
                      for j in range(cr.shape[1])])
    return scale, text


def _signs(d: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """sign(mean d) per feature (stats.mean_signs), NaN where a feature has no valid record."""
    x = np.where(ok, d, 0.0)
    return np.where(ok.any(axis=0), mean_signs(x.sum(axis=0), np.abs(x).sum(axis=0)), np.nan)


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


def _comparison_rows(names, split, comparison, d, ok, scale, agreement, ci, length, spec, n_inf,
                     tested, other_tested, other) -> list[dict]:
    rows = []
    for j, name in enumerate(names):
        dj = d[ok[:, j], j]
        reasons = [f"{n_inf[j]} record{'s' * (n_inf[j] > 1)} dropped for +/-inf"] if n_inf[j] else []
        if not np.isfinite(scale[j]):
            reasons.append("fewer than 2 records on the scale's split: no scale")
        elif scale[j] == 0:
            reasons.append("zero scale: chosen and rejected never differ on the scale's split")
        stat, p, why = wilcoxon(dj, spec.alpha)
        if tested[j] and not other_tested[j]:
            reasons.append(f"no sign agreement: {other} has no test")
        usable_scale = scale[j] if np.isfinite(scale[j]) and scale[j] > 0 else np.nan
        lo, hi = (ci[0][j], ci[1][j]) if np.isfinite(usable_scale) else (np.nan, np.nan)
        if np.isfinite(lo) and lo == hi:
            reasons.append("zero-width CI: every bootstrap mean is the same")
        adjusted, adjusted_p, why_len = _length_adjusted(d, ok, j, length)
        reasons += [r for r in (why, why_len) if r and r not in reasons]
        rows.append({
            "feature": name, "family": FEATURE_FAMILY.get(name, "other"), "split": split,
            "comparison": comparison, "n": int(dj.size), "mean_delta": float(dj.mean()) if dj.size else np.nan,
            "norm_mean_delta": float(dj.mean() / usable_scale) if dj.size else np.nan, "scale": float(scale[j]),
            "ci_low": float(lo), "ci_high": float(hi), "wilcoxon_stat": stat, "p_value": p,
            "effect_size": rank_biserial(dj), "sign_agreement": float(agreement[j]),
            "length_adjusted_delta": adjusted, "length_adjusted_norm_delta": adjusted / usable_scale,
            "length_adjusted_p": adjusted_p, "reason": "; ".join(reasons),
        })
    return rows


def _length_adjusted(d, ok, j, length) -> tuple[float, float, str]:
    if length is None:
        return np.nan, np.nan, f"no {LENGTH_FEATURE} feature for length control"
    if j == length:
        return np.nan, np.nan, f"{LENGTH_FEATURE} is the length control itself: no length-adjusted delta"
    both = ok[:, j] & ok[:, length]
    return intercept_at_zero(d[both, j], d[both, length])


def _finish(stats: pl.DataFrame) -> pl.DataFrame:
    """Add BH q-values per comparison x split (and q_family), with NaN (not null) for undefined numbers."""
    floats = [c for c, t in stats.schema.items() if t in (pl.Float64, pl.Int64) and c != "n"]
    stats = stats.with_columns([pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in floats])
    q, family = np.full(stats.height, np.nan), np.full(stats.height, "", dtype=object)
    groups = stats.with_row_index().group_by("comparison", "split").agg(pl.col("index"))
    for comparison, split, idx in groups.iter_rows():
        p = stats["p_value"].to_numpy()[idx]
        q[idx] = benjamini_hochberg(p)
        family[idx] = f"{comparison}, {split}: BH over {int(np.isfinite(p).sum())} features with a p-value"
    stats = stats.with_columns(pl.Series("q_value", q), pl.Series("q_family", family.tolist(), dtype=pl.String))
    order = ["feature", "family", "split", "comparison", "n", "mean_delta", "norm_mean_delta", "scale",
             "ci_low", "ci_high", "wilcoxon_stat", "p_value", "q_value", "q_family", "effect_size",
             "sign_agreement", "length_adjusted_delta", "length_adjusted_norm_delta", "length_adjusted_p", "reason"]
    return stats.select(order)


def _summary(stats: pl.DataFrame, parts: dict, names: list[str], spec: AnalysisSpec, scale_source: str) -> dict:
    significant = {c: {} for c in COMPARISONS}
    toward_chosen, share, agreement_p, n_pairs, n_prompts, n_signed = {}, {}, {}, {}, {}, {}
    power, length_share, dropped_inf = {}, {}, {}
    for split, part in parts.items():
        n_pairs[split] = part["n"]
        n_prompts[split] = part["n_prompts"]
        signed = part["agreement"][np.isfinite(part["agreement"]) & (part["agreement"] != 0)]  # both means nonzero
        share[split] = float(np.mean(signed == 1)) if signed.size else float("nan")
        n_signed[split] = int(signed.size)
        agreement_p[split] = part["p"]
        power[split] = {"n": part["n_prompts"], "unit": "prompts", "shift": POWER_SHIFT,
                        "power": wilcoxon_power(part["n_prompts"], POWER_SHIFT, spec.alpha)}
        if part["length"] is not None:
            dl = part["length"]
            length_share[split] = float(max((dl > 0).sum(), (dl < 0).sum()) / dl.size) if dl.size else float("nan")
        dropped_inf[split] = {names[j]: int(k) for j, k in enumerate(part["inf"]) if k}
        for comparison in COMPARISONS:
            rows = stats.filter((pl.col("split") == split) & (pl.col("comparison") == comparison))
            significant[comparison][split] = int((rows["q_value"] < spec.alpha).sum())
        # toward chosen: tuned moved significantly, chosen-vs-rejected is itself significant, same sign
        tuned = stats.filter((pl.col("split") == split) & (pl.col("comparison") == "tuned_vs_base")
                             & (pl.col("q_value") < spec.alpha) & (pl.col("sign_agreement") == 1))
        cr_significant = stats.filter((pl.col("split") == split) & (pl.col("comparison") == "chosen_vs_rejected")
                                      & (pl.col("q_value") < spec.alpha))["feature"]
        toward_chosen[split] = int(tuned["feature"].is_in(cr_significant.implode()).sum())
    return {"n_pairs": n_pairs, "n_prompts": n_prompts, "n_features": len(names), "alpha": spec.alpha,
            "scale_source": scale_source,
            "sign_agreement": share, "sign_agreement_features": n_signed, "sign_agreement_p": agreement_p,
            "sign_agreement_test": f"{SIGN_TEST}, {spec.permutations} permutations",
            "significant": significant, "significant_toward_chosen": toward_chosen, "q_family": Q_FAMILY,
            "power": power, "power_method": POWER_METHOD, "length_sign_share": length_share,
            "dropped_inf": dropped_inf}
