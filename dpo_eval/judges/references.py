"""Reference answers for reference-guided judging (issue 23 §2): from pairs.parquet's `reference` column or from a
JSONL file joined to the pairs by `question_id` (JudgeSpec.references, `--references FILE`).

The file holds one record per line, {question_id, choices: [{turns: [answer of turn 1, answer of turn 2, ...]}]}
(MT-Bench's reference_answer_gpt-4.jsonl); a pair takes turns[0] for its turn 1 and turns[1] for its turn 2 (a
two-turn set's dialogue prompt, dpo_eval.judges.dialogue). question_ids are compared as text, so 81 and "81" join.
On each turn the file's reference wins over pairs.parquet's (`reference`, `reference_turn2`) where both give one.
A missing or unreadable file, a line that is not a JSON object, a record without question_id or answers, a
question_id given twice (in the file or among the selected pairs), pairs without a question_id column, or a file
none of whose questions is among the selected pairs is a DpoEvalError naming the file (and the line).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from dpo_eval.errors import DpoEvalError

FORMAT = ("one JSON object per line, {question_id, choices: [{turns: [answer, ...]}]}, as MT-Bench's "
          "reference_answer_gpt-4.jsonl")


def read_references(path: Path) -> dict[str, list[str]]:
    """question_id (as text) -> the reference answers per turn, from a references JSONL file."""
    where = f"--references {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DpoEvalError(f"{where}: no such file; give a JSONL file of reference answers ({FORMAT})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DpoEvalError(f"{where}: cannot read it as UTF-8 text ({exc}); give {FORMAT}") from None
    found: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DpoEvalError(f"{where} line {number}: not JSON ({exc.msg}); the file must hold {FORMAT}") from None
        if not isinstance(record, dict) or record.get("question_id") is None:
            raise DpoEvalError(f"{where} line {number}: no question_id; each line must be {FORMAT}")
        qid = str(record["question_id"])
        choices = record.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        turns = first.get("turns") if isinstance(first, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise DpoEvalError(f"{where} line {number} (question_id {qid}): no reference answer in choices[0].turns "
                               "(a list of strings, one per turn)")
        if qid in found:
            raise DpoEvalError(f"{where} line {number}: question_id {qid} again (first on line {first_line[qid]}); "
                               "keep one record per question")
        found[qid], first_line[qid] = turns, number
    if not found:
        raise DpoEvalError(f"{where}: holds no record; give {FORMAT}")
    return found


def _pick(value, turn: int) -> str:
    """The reference of `turn` from a text or a list of texts per turn ("" where there is none or it is blank)."""
    if isinstance(value, (list, tuple)):
        value = value[turn - 1] if len(value) >= turn else None
    return value if isinstance(value, str) and value.strip() else ""


def pair_references(pairs: pl.DataFrame, references: Path | None, pairs_file: Path) -> dict[str, tuple[str, str]]:
    """pair_id -> (turn 1's reference, turn 2's; "" where none), for the selected `pairs` that have at least one
    (see the module docstring)."""
    found: dict[str, tuple[str, str]] = {}
    columns = [c for c in ("pair_id", "question_id", "reference", "reference_turn2") if c in pairs.columns]
    rows = pairs.select(columns).to_dicts()
    for row in rows:
        second = row.get("reference_turn2") or _pick(row.get("reference"), 2)  # a list column: one per turn
        own = (_pick(row.get("reference"), 1), _pick(second, 1))
        if any(own):
            found[row["pair_id"]] = own
    if references is None:
        return found
    by_question = read_references(references)
    if "question_id" not in pairs.columns:
        raise DpoEvalError(f"--references {references}: {pairs_file} has no question_id column to join it on; give "
                           "references only for a prompt set whose pairs carry their question_id (e.g. MT-Bench)")
    twice = pairs.filter(pl.col("question_id").is_not_null() & pl.col("question_id").is_duplicated())
    if twice.height:  # which record's reference is which would be a guess
        raise DpoEvalError(f"--references {references}: question_id {twice['question_id'][0]} is on {twice.height} "
                           f"pairs in {pairs_file} (pair_ids {', '.join(twice['pair_id'].head(3))}); give each "
                           "question of the prompt set its own question_id")
    joined = 0
    for row in rows:
        turns = by_question.get(str(row["question_id"])) if row["question_id"] is not None else None
        given = tuple(_pick(turns, turn) if turns else "" for turn in (1, 2))
        if any(given):
            own = found.get(row["pair_id"], ("", ""))
            found[row["pair_id"]] = tuple(g or o for g, o in zip(given, own))
            joined += 1
    if not joined:
        ours = sorted({str(q) for q in pairs["question_id"].drop_nulls().to_list()})[:5]
        theirs = list(by_question)[:5]
        raise DpoEvalError(f"--references {references}: none of its {len(by_question)} question_ids (e.g. "
                           f"{', '.join(theirs)}) matches a question_id of the {pairs.height} selected pairs in "
                           f"{pairs_file} (e.g. {', '.join(ours) or 'none'}); give the reference file of this "
                           "prompt set")
    return found
