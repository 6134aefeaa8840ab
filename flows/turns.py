"""The second turn of a two-turn prompt set inside the evaluation flow (dpo_eval.generation.turns)."""

from __future__ import annotations

import polars as pl
from dpo_eval.tasks.evaluation import generate_answers_task

from dpo_eval import stages
from dpo_eval.generation.turns import second_turn_pairs, with_turn


def generate_second_turn(config, pairs: pl.DataFrame, first: pl.DataFrame, identity) -> tuple[pl.DataFrame, dict]:
    """(answers of both turns with `turn`, the turn-2 cache counts): each model answers turn 2 after its own turn-1
    answer, shard by shard, in this process, through the same cached generation task as turn 1 (the dialogue is in
    the shard's content, so its cache key changes with the turn-1 answer)."""
    states = []
    for model in ("base", "tuned"):
        asked = second_turn_pairs(pairs, first, model)
        for shard in stages.shard_pairs(asked, config.shard_size):
            states.append(generate_answers_task(spec=config.model, generation=config.generation, shard=shard,
                                                model=model, key=identity.key(model), return_state=True))
    second = [stages.with_worker(s.result()[0]) for s in states]
    hits = sum(s.name == "Cached" for s in states)
    answers = pl.concat([with_turn(first, 1), *[with_turn(a, 2) for a in second]], how="diagonal_relaxed")
    return answers, {"hits": hits, "misses": len(states) - hits}


def second_turn_texts(pairs: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    """texts_of's rows (pair_id, prompt_id, split, role, text) of the base and tuned turn-2 answers."""
    from dpo_eval.generation.turns import answers_of_turn

    texts = stages.texts_of(pairs, answers_of_turn(answers, 2))
    return texts.filter(pl.col("role").is_in(["base", "tuned"]))


def write_groups(groups: dict, out, alpha: float) -> tuple[dict, list]:
    """Write stats_turns.parquet and stats_categories.parquet where computed; (summary.json's `turns` and
    `feature_categories`, the report's section)."""
    from dpo_eval.report.categories import feature_groups_section

    summary, sections = {}, []
    if groups["turns"] is not None:
        groups["turns"][0].write_parquet(out / "stats_turns.parquet")
        summary["turns"] = groups["turns"][1]
    if groups["categories"] is not None:
        groups["categories"][0].write_parquet(out / "stats_categories.parquet")
        summary["feature_categories"] = groups["categories"][1]
    if summary:
        sections.append(feature_groups_section(summary, groups["categories"][0] if groups["categories"] else None,
                                               alpha))
    return summary, sections
