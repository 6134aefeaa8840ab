"""Prompt sets without labels that carry more than a question: a second turn, a category, a reference answer.

MT-Bench's question file is the model (`{question_id, category, turns: [q1, q2], reference: [r1, r2]?}`): a record
with a `turns` list of one or two user turns and no chosen or rejected is such a prompt set. Turn 1 is the pair's
prompt; turn 2 is asked later, after each model's own turn-1 answer (dpo_eval.generation.turns). A category comes
from the record's own `category` field or from DatasetSpec.category_field (`--category-field NAME`) for any format;
`question_id` and `reference` are read from such records only (a labelled set's fields of those names stay unread).

The extra columns of pairs.parquet (present only where the data set has them, so single-turn sets keep the table
they always had): `turn2` (the turn-2 question), `question_id`, `category`, `reference` (turn 1's reference answer,
MT-Bench's short one) and `reference_turn2` (turn 2's).
"""

from __future__ import annotations

from typing import Any

from dpo_eval.errors import DpoEvalError

TURNS = "turns"
TURN2 = "turn2"
CATEGORY = "category"
EXTRA_COLUMNS = (TURN2, "question_id", CATEGORY, "reference", "reference_turn2")


def is_turns_record(record: dict[str, Any]) -> bool:
    """Whether `record` is a question list in MT-Bench's shape: a `turns` list and no labels."""
    return isinstance(record.get(TURNS), list) and not ({"chosen", "rejected", "prompt", "question"} & set(record))


def turns_of(record: dict[str, Any], where: str) -> tuple[str, str | None]:
    """(turn 1, turn 2 or None) of a `turns` record; a DpoEvalError for anything but one or two texts."""
    turns = record[TURNS]
    if not 1 <= len(turns) <= 2 or not all(isinstance(t, str) and t.strip() for t in turns):
        raise DpoEvalError(f"{where}: 'turns' must hold one or two non-empty texts (the user's turns, as MT-Bench's "
                           f"question.jsonl); it holds {len(turns)} item(s) of types "
                           f"{sorted({type(t).__name__ for t in turns})}")
    return turns[0], (turns[1] if len(turns) == 2 else None)


def _text_or_none(value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    raise DpoEvalError(f"{where}: '{field}' must be a text or a number, got {type(value).__name__} "
                       f"({str(value)[:60]!r})")


def extras(record: dict[str, Any], where: str, category_field: str | None, turn2: str | None) -> dict:
    """The extra pairs.parquet columns of one record (module docstring); only the keys this record set has. Other
    formats' records (labelled pairs, prompts) keep their fields as they were: only --category-field reads them."""
    out: dict[str, str | None] = {}
    if TURNS in record and isinstance(record[TURNS], list):
        out[TURN2] = turn2
    prompt_set = is_turns_record(record)
    if prompt_set and "question_id" in record:
        out["question_id"] = _text_or_none(record["question_id"], where, "question_id")
    field = category_field or (CATEGORY if prompt_set and CATEGORY in record else None)
    if field is not None:
        if field not in record:
            raise DpoEvalError(f"{where}: --category-field {field!r} is not among its fields {sorted(record)}; name "
                               "the field that holds each record's category")
        out[CATEGORY] = _text_or_none(record[field], where, field)
    if prompt_set and "reference" in record:
        out["reference"], out["reference_turn2"] = _references(record["reference"], where)
    return out


def _references(value: Any, where: str) -> tuple[str | None, str | None]:
    """(turn 1, turn 2) of a reference: a text (turn 1 only) or MT-Bench's list, one per turn."""
    if value is None or isinstance(value, str):
        return value, None
    if isinstance(value, list) and len(value) <= 2 and all(v is None or isinstance(v, str) for v in value):
        padded = list(value) + [None] * (2 - len(value))
        return padded[0], padded[1]
    raise DpoEvalError(f"{where}: 'reference' must be a text or a list of one text per turn (at most two)")


TURN = "turn"  # answers.parquet and judgments.parquet of a two-turn set: 1 or 2 (absent for a single-turn set)


def first_turn(frame):
    """The turn-1 rows of an answers or judgments table, without `turn` (every row where the table has no `turn`):
    what every reader written for one answer per pair and model (one judgment per pair and order) reads."""
    import polars as pl

    if frame is None or TURN not in frame.columns:
        return frame
    return frame.filter(pl.col(TURN) == 1).drop(TURN)
