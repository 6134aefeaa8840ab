"""Judging each judgment K times (JudgeSpec.repeats): the judge's own variance.

Each judgment (pair x comparison x order) is asked K times at the judge's temperature; repeat r's cache key is the
judgment's key with r added (repeat 0 keeps the plain key, so a run without repeats shares its cache), so repeats
are real calls, not cache hits. judgments.parquet keeps one row per judgment: its verdict is the majority over the
repeats with a readable verdict (first, second, tie); where two verdicts have the most votes (e.g. one first and one
second of two repeats) it is a tie, as two orders that disagree are; with no readable repeat it is the first
repeat's (invalid or failed). Its `raw`, `p_first` and `latency_s` are those of the first repeat naming the headline
verdict (the first repeat where none does), its five-level `strength` the one most of the repeats naming the headline
verdict give (the weaker on a tie; 0 for a tie by an even split), its tokens the sum over the repeats, `cached` true where every repeat
came from the cache; `repeat_verdicts` lists the K verdicts in repeat order.

summary.json's judge block gains `repeatability` {k, n, changed, share_changed, temperature, note}: n the judgments
whose K repeats all have a readable verdict, share_changed the share of them whose verdict is not the same in
every repeat, strength_changed (five levels) the judgments whose verdict held but whose strength changed.
"""

from __future__ import annotations

import polars as pl

from dpo_eval.jsonsafe import json_key

READABLE = ("first", "second", "tie")
KEYS = ["pair_id", "split", "comparison", "judge", "order"]


def repeat_key(key: str, repeat: int) -> str:
    """The cache key of repeat `repeat` (0, 1, ...) of the judgment keyed `key`: `key` itself for repeat 0."""
    return key if repeat == 0 else json_key([key, {"repeat": repeat}])


def expand(requests: list[dict], k: int) -> list[dict]:
    """Each request K times, repeat r keyed by repeat_key (repeat-major: every judgment's first asking comes first,
    so a --max-calls budget makes whole first passes before any repeat)."""
    if k <= 1:
        return requests
    return [req | {"repeat": r, "key": repeat_key(req["key"], r)} for r in range(k) for req in requests]


def headline(verdicts: list[str]) -> str:
    """The majority of the readable verdicts; a tie where two verdicts share the most votes; the first verdict where
    none is readable."""
    readable = [v for v in verdicts if v in READABLE]
    if not readable:
        return verdicts[0]
    tally = {v: readable.count(v) for v in READABLE}
    top = max(tally.values())
    leaders = [v for v, c in tally.items() if c == top]
    return leaders[0] if len(leaders) == 1 else "tie"


def fold(tables: list[pl.DataFrame], temperature: float) -> tuple[pl.DataFrame, dict]:
    """(one row per judgment, the repeatability block) from the judgment tables of repeats 0..K-1 (in order)."""
    k = len(tables)
    stacked = pl.concat([t.with_columns(repeat=pl.lit(r)) for r, t in enumerate(tables)], how="diagonal_relaxed")
    rows, n, changed, strength_changed = [], 0, 0, 0
    keys = KEYS + (["turn"] if "turn" in stacked.columns else [])  # a two-turn set: each turn its own judgment
    for _, group in stacked.sort("repeat").group_by(keys, maintain_order=True):
        made = group.to_dicts()
        verdicts = [r["verdict"] for r in made]
        verdict = headline(verdicts)
        shown = next((r for r in made if r["verdict"] == verdict), made[0])
        winner = shown["winner"] if shown["verdict"] == verdict else "tie"  # a tie by an even split of votes
        if len(made) == k and all(v in READABLE for v in verdicts):
            n += 1
            changed += len(set(verdicts)) > 1
        strength = {}
        if "strength" in shown:  # five levels: the strength most repeats naming the verdict give (ties: the weaker)
            named = [r["strength"] for r in made if r["verdict"] == verdict and r["strength"] is not None]
            strength = {"strength": 0 if shown["verdict"] != verdict else
                        min(set(named), key=lambda v: (-named.count(v), v)) if named else shown["strength"]}
            if len(made) == k and all(v in READABLE for v in verdicts) and len(set(verdicts)) == 1:
                strength_changed += len({r["strength"] for r in made}) > 1
        rows.append({**{c: v for c, v in shown.items() if c != "repeat"}, "verdict": verdict, "winner": winner,
                     "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in made),
                     "completion_tokens": sum(r["completion_tokens"] or 0 for r in made),
                     "cached": all(r["cached"] for r in made), "repeat_verdicts": verdicts, **strength})
    table = pl.DataFrame(rows, schema=tables[0].schema | {"repeat_verdicts": pl.List(pl.String)})
    note = ("at temperature 0 the judge's most likely verdict is asked each time: repeats measure only the server's "
            "nondeterminism (batching, kernels), not the judge's sampling" if temperature == 0 else
            f"repeats sampled at temperature {temperature:g}: the share of verdicts that change is the judge's own "
            "variance at that temperature")
    return table, {"k": k, "n": n, "changed": changed, "share_changed": changed / n if n else None,
                   "strength_changed": strength_changed,
                   "temperature": temperature, "note": note,
                   "rule": "headline verdict: majority over the repeats with a readable verdict; a tie where two "
                           "verdicts share the most votes"}
