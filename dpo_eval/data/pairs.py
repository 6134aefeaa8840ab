"""Read any common shape of DPO preference data into one table, and split it.

The table has the columns of `pairs.parquet` (design.md): `pair_id`, `split`, `system`, `prompt`,
`chosen`, `rejected`, plus `messages`: the prompt's turns as JSON (system excluded), which the
generation stage renders through a chat template.

A data set of questions without labels (the `prompts` format: a user's own questions) gives the same
table with `chosen` and `rejected` null; its records are the valid split unless they name a split
(never trained on, they are held out by nature).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import polars as pl

from dpo_eval.config import DatasetSpec
from dpo_eval.data.formats import Pair, detect_format, normalise
from dpo_eval.data.prompt_sets import EXTRA_COLUMNS, TURNS, extras, turns_of
from dpo_eval.data.sources import read_records
from dpo_eval.errors import DpoEvalError

PAIR_COLUMNS = ["pair_id", "split", "system", "prompt", "chosen", "rejected", "messages"]
SPLIT_NAMES = {
    "train": "train", "training": "train",
    "valid": "valid", "validation": "valid", "val": "valid", "eval": "valid", "test": "valid", "dev": "valid",
}


@dataclass
class LoadReport:
    """What loading did: records read, the format, duplicates and records left out (with reasons)."""

    source: str
    format: str
    records: int = 0
    duplicates: int = 0
    left_out: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "records": self.records,
                "duplicates": self.duplicates, "left_out": dict(self.left_out),
                "left_out_total": sum(self.left_out.values()), "pairs": dict(self.pairs),
                "total": sum(self.pairs.values())}


def pair_id(system: str, prompt: str, chosen: str, rejected: str) -> str:
    """A content hash of (system, prompt, chosen, rejected): stable across runs, machines and row order."""
    payload = json.dumps([system, prompt, chosen, rejected], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def prompt_key(system: str, turns: list) -> str:
    """A content hash of a pair's prompt (system prompt and every turn): the unit of the train/valid split, so that
    the several pairs of one prompt (hh-rlhf has 2, UltraFeedback-style sets 4) fall on one side, never both."""
    payload = json.dumps([system, turns], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def hash_split(pid: str, seed: int, valid_fraction: float) -> str:
    """'valid' for a `valid_fraction` share of ids, decided by hash(seed, id) alone (read_pairs passes the
    prompt_key, so a prompt's pairs share their split)."""
    digest = hashlib.sha256(f"{seed}:{pid}".encode()).digest()
    return "valid" if int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction else "train"


def load_pairs(spec: DatasetSpec | str) -> pl.DataFrame:
    """The preference pairs of `spec` as a table (see the module docstring)."""
    return read_pairs(spec)[0]


def read_pairs(spec: DatasetSpec | str) -> tuple[pl.DataFrame, LoadReport]:
    """The pairs table and a LoadReport of what was kept, merged and left out."""
    if isinstance(spec, str):
        spec = DatasetSpec(source=spec)
    raw = read_records(spec.source, spec.revision, spec.hub_split)
    fmt = spec.format
    if fmt == "auto":
        fmt = "columns" if spec.columns else _detect(raw, spec.source)
    report = LoadReport(source=spec.source, format=fmt, records=len(raw))
    left_out: Counter[str] = Counter()
    seen: set[str] = set()
    rows = []
    for index, (record, source_split) in enumerate(raw, start=1):
        where = f"{spec.source}, record {index}"
        pair = normalise(record, fmt, spec.columns, where)
        reason = _leave_out_reason(pair, labeled=fmt != "prompts")
        if reason:
            left_out[reason] += 1
            continue
        prompt = pair.prompt
        turn2 = turns_of(record, where)[1] if fmt == "prompts" and isinstance(record.get(TURNS), list) else None
        pid = pair_id(pair.system, prompt if turn2 is None else json.dumps([prompt, turn2], ensure_ascii=False),
                      pair.chosen, pair.rejected)
        if pid in seen:
            report.duplicates += 1
            continue
        seen.add(pid)
        given = pair.split or source_split
        split = ("valid" if given is None and fmt == "prompts" else
                 _split_of(given, prompt_key(pair.system, pair.turns), spec, where))
        rows.append({"pair_id": pid, "split": split, "system": pair.system, "prompt": prompt,
                     "chosen": pair.chosen, "rejected": pair.rejected,
                     "messages": json.dumps([{"role": r, "content": c} for r, c in pair.turns],
                                            ensure_ascii=False)}
                    | extras(record, where, spec.category_field, turn2))
        if spec.limit is not None and len(rows) >= spec.limit:
            break
    present = [c for c in EXTRA_COLUMNS if any(c in row for row in rows)]  # a single-turn set keeps its columns
    table = pl.DataFrame([{c: row.get(c) for c in PAIR_COLUMNS + present} for row in rows],
                         schema={c: pl.String for c in PAIR_COLUMNS + present})
    report.left_out = dict(left_out)
    report.pairs = {s: int((table["split"] == s).sum()) for s in ("train", "valid")}
    if table.height == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "none of them a preference record"
        raise DpoEvalError(f"{spec.source}: no usable pair: {report.records} records read as format {fmt!r}, every "
                           f"one left out ({reasons}). Check the file, or name its format and columns "
                           "(--format, --columns prompt=...,chosen=...,rejected=...)")
    return table, report


def _detect(raw, source: str) -> str:
    if not raw:
        raise DpoEvalError(f"{source}: holds no records")
    return detect_format(raw[0][0], f"{source}, record 1")


def is_labeled(pairs: pl.DataFrame) -> bool:
    """Whether the pairs carry chosen and rejected answers (a `prompts` data set does not)."""
    return pairs.height > 0 and bool(pairs["chosen"].is_not_null().any())


def _leave_out_reason(pair: Pair, labeled: bool = True) -> str | None:
    if not labeled:
        return None if pair.prompt.strip() else "empty prompt"
    if pair.chosen is None or not pair.chosen.strip():
        return "empty or missing chosen"
    if pair.rejected is None or not pair.rejected.strip():
        return "empty or missing rejected"
    if pair.chosen == pair.rejected:
        return "chosen identical to rejected"
    if not pair.prompt.strip():
        return "empty prompt"
    return None


def _split_of(given: str | None, key: str, spec: DatasetSpec, where: str) -> str:
    if given is None:
        return hash_split(key, spec.seed, spec.valid_fraction)
    name = SPLIT_NAMES.get(given.strip().lower())
    if name is None:
        raise DpoEvalError(f"{where}: split '{given}' is neither train nor valid "
                           f"(known names: {sorted(SPLIT_NAMES)}); rename it or drop the split column")
    return name


def prompt_turns(row: dict) -> list[dict[str, str]]:
    """The prompt of a pairs row as chat messages, system prompt excluded."""
    return json.loads(row["messages"]) if row.get("messages") else [{"role": "user", "content": row["prompt"]}]


PROMPT_ID = "prompt_id"


def prompt_id(row: dict) -> str:
    """The prompt_key of a pairs row: (system, every turn), the key read_pairs drew its split by. The unit of
    tuned and base answers: the pairs of one prompt share one answer of each model and count once in the
    tuned-vs-base statistics."""
    turns = [(m["role"], m["content"]) for m in prompt_turns(row)]
    return prompt_key(row.get("system"), turns)


def prompt_ids(pairs: pl.DataFrame) -> list[str]:
    """prompt_id of every row of `pairs`, in row order."""
    return [prompt_id(row) for row in pairs.iter_rows(named=True)]


def prompt_table(pairs: pl.DataFrame) -> pl.DataFrame:
    """`pair_id, prompt_id` of every row of `pairs`."""
    return pairs.select("pair_id", prompt_id=pl.Series(prompt_ids(pairs), dtype=pl.String))


def one_pair_per_prompt(frame: pl.DataFrame, prompts: pl.DataFrame | None) -> pl.DataFrame:
    """The rows of `frame` (any rows keyed by pair_id, several per pair allowed) of one pair per prompt: the smallest
    pair_id present, prompts from `prompts` (pair_id, prompt_id; a pair without one is its own prompt). A prompt's
    pairs share its tuned and base answers, so their tuned-vs-base verdicts are copies of one."""
    if prompts is None or frame.height == 0:
        return frame
    keep = (frame.select("pair_id").unique().join(prompts, on="pair_id", how="left")
            .with_columns(pl.col("prompt_id").fill_null(pl.col("pair_id")))
            .sort("pair_id").unique("prompt_id", keep="first")["pair_id"])
    return frame.filter(pl.col("pair_id").is_in(keep.implode()))


def prompt_representatives(pairs: pl.DataFrame) -> tuple[list[int], list[int]]:
    """(rows, of): `rows` the row of each distinct prompt's representative, the pair with the smallest pair_id (so
    the choice never depends on row order), in order of first appearance; `of[i]` the position in `rows` of row
    i's prompt. A table whose prompts are all distinct gives every row as its own representative."""
    ids, keys = pairs["pair_id"].to_list(), prompt_ids(pairs)
    best: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in best or ids[i] < ids[best[key]]:
            best[key] = i
    position = {key: k for k, key in enumerate(best)}
    return list(best.values()), [position[key] for key in keys]
