"""Two-turn prompt sets (MT-Bench): turn 2 is asked after each model's own turn-1 answer.

A pairs table with a `turn2` column (dpo_eval.data.prompt_sets) is answered in two rounds. Round one is the usual
generation of the prompt (turn 1). Round two gives each model the dialogue [user: turn 1, assistant: that same
model's turn-1 answer, user: turn 2] as its prompt `messages`, so it goes through the chat template where the model
has one and the plain prompt format (a Human/Assistant transcript) otherwise, exactly as any multi-turn prompt
(dpo_eval.generation.prompts). Its cache key holds the dialogue, so a new turn-1 answer is a new turn-2 prompt.

answers.parquet of a two-turn set carries `turn` (1, 2); a single-turn set's answers have no `turn` column (their
file is the one they always had).
"""

from __future__ import annotations

import json

import polars as pl

from dpo_eval.data.prompt_sets import TURN, TURN2, first_turn


def has_second_turn(pairs: pl.DataFrame) -> bool:
    """Whether any pair of `pairs` has a turn-2 question."""
    return TURN2 in pairs.columns and bool(pairs[TURN2].is_not_null().any())


def answers_of_turn(answers: pl.DataFrame, turn: int) -> pl.DataFrame:
    """The rows of one turn (turn 1 is every row of a single-turn table), without the `turn` column."""
    return first_turn(answers) if turn == 1 else answers.filter(pl.col(TURN) == turn).drop(TURN)


def dialogue(row: dict, answer: str) -> list[dict]:
    """The turn-2 prompt of one pair: its turn-1 messages, the model's own turn-1 answer, the turn-2 question."""
    turns = json.loads(row["messages"]) if row.get("messages") else [{"role": "user", "content": row["prompt"]}]
    return turns + [{"role": "assistant", "content": answer}, {"role": "user", "content": row[TURN2]}]


def second_turn_pairs(pairs: pl.DataFrame, answers: pl.DataFrame, model: str) -> pl.DataFrame:
    """The pairs with a turn-2 question, their `messages` the dialogue `model` saw (`dialogue`), in pairs order;
    answers are `model`'s turn-1 answers (pair_id, model, answer)."""
    own = answers.filter(pl.col("model") == model).select("pair_id", "answer")
    asked = pairs.filter(pl.col(TURN2).is_not_null()).join(own, on="pair_id", how="inner", maintain_order="left")
    messages = [json.dumps(dialogue(row, row["answer"]), ensure_ascii=False) for row in asked.iter_rows(named=True)]
    return asked.drop("answer").with_columns(pl.Series("messages", messages, dtype=pl.String))


def with_turn(answers: pl.DataFrame, turn: int) -> pl.DataFrame:
    """`answers` with the `turn` column set to `turn`."""
    return answers.with_columns(pl.lit(turn, dtype=pl.Int64).alias(TURN))


def generate_two_turns(loaded, pairs: pl.DataFrame, first: pl.DataFrame, spec, on_batch=None) -> pl.DataFrame:
    """Both turns' answers (with `turn`) from one load: `first` are the turn-1 answers (generate_both's rows); each
    model then answers its own dialogue (second_turn_pairs). The command line's path; the flow generates turn 2
    shard by shard through its cached task (flows/turns.py)."""
    from dpo_eval.generation.generate import generate_both

    parts = [with_turn(first, 1)]
    for model in first["model"].unique(maintain_order=True).to_list():
        asked = second_turn_pairs(pairs, first, model)
        if asked.height:
            parts.append(with_turn(generate_both(loaded, asked, spec, models=(model,), on_batch=on_batch), 2))
    return pl.concat(parts)
