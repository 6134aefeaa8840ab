"""Per-source results of a run over several data sets (`evaluate --dataset A --dataset B`).

Each source's pairs are analysed alone, exactly as a run on that data set alone would be (its own S_j from
its own train split, its own q-values), and reported beside the pooled analysis: did the alignment take on
hh-rlhf's prompts, on orca's, or on both?
"""

from __future__ import annotations

import polars as pl

from dpo_eval.config import AnalysisSpec
from dpo_eval.data.mixing import SOURCE
from dpo_eval.report.page import Section

KEPT = ("n_pairs", "sign_agreement", "sign_agreement_p", "significant", "significant_toward_chosen", "scale_source")


def has_sources(pairs: pl.DataFrame) -> bool:
    """Whether the pairs come from more than one data set."""
    return SOURCE in pairs.columns and pairs[SOURCE].n_unique() > 1


def per_source(features: pl.DataFrame, pairs: pl.DataFrame, spec: AnalysisSpec,
               rewards: pl.DataFrame | None = None) -> dict:
    """{source: the summary's per-split figures (n_pairs, sign_agreement and its p, significant counts) of the
    analysis of that source's pairs alone, plus implicit_reward per split when `rewards` is given}."""
    from dpo_eval.generation.logprobs import reward_summary
    from dpo_eval.stats.analysis import run_analysis

    out = {}
    for source in dict.fromkeys(pairs[SOURCE].to_list()):
        ids = pairs.filter(pl.col(SOURCE) == source)["pair_id"].implode()
        summary = run_analysis(features.filter(pl.col("pair_id").is_in(ids)), spec).summary
        out[source] = {key: summary[key] for key in KEPT if key in summary}
        if rewards is not None:
            out[source]["implicit_reward"] = reward_summary(rewards.filter(pl.col("pair_id").is_in(ids)))
    return out


def source_section(results: dict) -> Section:
    """The report's per-source table: one row per source and split."""
    rows = []
    for source, result in results.items():
        for split, n in result["n_pairs"].items():
            reward = (result.get("implicit_reward") or {}).get(split, {})
            rows.append([source, split, n, result["sign_agreement"].get(split),
                         result["sign_agreement_p"].get(split),
                         result["significant"]["tuned_vs_base"].get(split),
                         result["significant"]["chosen_vs_rejected"].get(split),
                         reward.get("accuracy"), reward.get("margin_mean")])
    return Section("per_source", "Per data set", [
        "Each data set's pairs analysed alone (its own scale S_j from its own train split, its own q-values), as "
        "a run on that data set alone would give; the tables above pool every data set."],
        ["data set", "split", "pairs", "sign agreement", "sign agreement p", "tuned vs base significant",
         "chosen vs rejected significant", "implicit reward accuracy", "mean margin"], rows)
