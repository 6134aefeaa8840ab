"""Judging turn 2 of a two-turn prompt set with the whole dialogue in front of the judge.

Each model answered turn 2 after its own turn-1 answer (dpo_eval.generation.turns), so the two dialogues differ
from their second message on. The judge template keeps its variables (system, prompt, answer_a, answer_b; any
user template works unchanged): `prompt` holds both user turns (and the reference answers where the question has
them), and each answer holds that assistant's side of its dialogue, the turn-2 answer under judgment first and
its own turn-1 answer after it as context. The prompt does not depend on the order, so both orders are cut alike;
an answer cut to fit the judge's context keeps its beginning, the turn-2 answer, and loses context first.
"""

from __future__ import annotations

import polars as pl

from dpo_eval.data.prompt_sets import TURN, TURN2, first_turn

TURN2_COMPARISONS = ("tuned_vs_base",)  # chosen and rejected answer turn 1 only (MT-Bench sets have neither)


def dialogue_prompt(turn1: str, turn2: str, reference: str | None = None, reference_turn2: str | None = None) -> str:
    """The judge's `prompt` for turn 2: the two user turns, then the reference answers where there are any."""
    text = (f"[Turn 1, the user]\n{turn1}\n\n[Turn 2, the user, after each assistant's own turn-1 answer]\n{turn2}\n\n"
            "Judge the assistants' turn-2 answers, each in the light of its own dialogue.")
    refs = [f"[Reference answer, turn {k}]\n{r}" for k, r in ((1, reference), (2, reference_turn2)) if r]
    return text + ("\n\n" + "\n\n".join(refs) if refs else "")


def dialogue_answer(turn1_answer: str, turn2_answer: str) -> str:
    """One assistant's side of its dialogue: the turn-2 answer judged, then its turn-1 answer as context."""
    return (f"[Its turn-2 answer, judged here]\n{turn2_answer}\n\n"
            f"[Its own turn-1 answer, which it saw when asked turn 2]\n{turn1_answer}")


def second_turn_rows(pairs: pl.DataFrame, answers: pl.DataFrame | None, comparisons: tuple[str, ...],
                     references: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    """Comparison rows (pairwise.comparison_rows' shape, `turn` 2) of tuned vs base at turn 2: pairs with a turn-2
    question and both models' answers to both turns; none where answers.parquet has no `turn`. `references`
    (pair_id -> both turns' references, dpo_eval.judges.references.pair_references) replaces pairs' own columns."""
    if answers is None or TURN not in answers.columns or TURN2 not in pairs.columns or \
            "tuned_vs_base" not in comparisons:
        return []

    def wide(part: pl.DataFrame, suffix: str) -> pl.DataFrame:
        part = part.filter(pl.col("model").is_in(["tuned", "base"]))
        return part.pivot(on="model", index="pair_id", values="answer", aggregate_function="first").rename(
            {m: m + suffix for m in ("tuned", "base") if m in part["model"].unique().to_list()})

    one, two = wide(first_turn(answers), "_1"), wide(answers.filter(pl.col(TURN) == 2).drop(TURN), "_2")
    refs = [c for c in ("reference", "reference_turn2") if c in pairs.columns]
    table = pairs.filter(pl.col(TURN2).is_not_null()).select(
        "pair_id", "split", "prompt", TURN2, *refs, system=pl.col("system").fill_null("")).join(
        one, on="pair_id", how="inner").join(two, on="pair_id", how="inner")
    needed = ("tuned_1", "base_1", "tuned_2", "base_2")
    rows = []
    for pair in table.iter_rows(named=True):
        if any(pair.get(c) is None for c in needed):
            continue
        if references is not None:
            pair["reference"], pair["reference_turn2"] = references.get(pair["pair_id"], (None, None))
        rows.append({"pair_id": pair["pair_id"], "split": pair["split"], "comparison": "tuned_vs_base",
                     "system": pair["system"], "turn": 2,
                     "prompt": dialogue_prompt(pair["prompt"], pair[TURN2], pair.get("reference"),
                                               pair.get("reference_turn2")),
                     "roles": ("tuned", "base"),
                     "texts": (dialogue_answer(pair["tuned_1"], pair["tuned_2"]),
                               dialogue_answer(pair["base_1"], pair["base_2"]))})
    return rows
