"""Thin Prefect tasks of two-turn prompt sets and categories: the feature tests per turn and per category."""

from __future__ import annotations

import polars as pl
from prefect import task
from prefect.cache_policies import NO_CACHE

from dpo_eval.config import AnalysisSpec


@task(name="compare-turns-and-categories", cache_policy=NO_CACHE)
def compare_groups_task(features_by_turn: dict[int, pl.DataFrame], pairs: pl.DataFrame, spec: AnalysisSpec,
                        main: pl.DataFrame) -> dict:
    """{turns: (stats rows with turn, summary) or None, categories: (rows, summary) or None}."""
    from dpo_eval.data.prompt_sets import CATEGORY
    from dpo_eval.stats.groups import category_summary, category_tests, turn_tests

    out = {"turns": None, "categories": None}
    if len(features_by_turn) > 1:
        out["turns"] = turn_tests(features_by_turn, spec, main)
    if CATEGORY in pairs.columns:
        categories = pairs.select("pair_id", CATEGORY)
        table = pl.concat([category_tests(f, categories, turn, spec.alpha) for turn, f in sorted(features_by_turn.items())])
        out["categories"] = (table, category_summary(table, spec.alpha))
    return out
