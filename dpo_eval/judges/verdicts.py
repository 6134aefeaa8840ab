"""Reading a judge's reply by its style and levels, and the strength-weighted win rate (issue 23 §2).

Styles. verdict: the reply is the verdict only; three levels are read by prompt.parse_verdict (unchanged), five
levels by the same rule with the five marks. reasoned: a justification, then the verdict alone on the last
non-empty line; that line must hold exactly one distinct mark, anything else (no mark there, two different marks,
a verdict only inside the justification) is invalid, so a rationale without a final verdict is never cached. The
rationale is the text before that line.

Levels and strength. Three: [[A]] / [[B]] (strength 1) and [[C]] or [[tie]] (a tie, strength 0; the verdict style
keeps its [[tie]] only). Five: [[A>>B]], [[B>>A]] (strength 2), [[A>B]], [[B>A]] (strength 1), [[A=B]] (a tie,
strength 0). The headline win rate counts a verdict once whatever its strength.

Weighted win rate (Arena-Hard's weighting): each order's verdict is one game, a strong one counted STRONG_WEIGHT
times: rate = sum_g w_g s_g / sum_g w_g over both orders of the pairs the win rate counts (one pair per prompt,
both orders valid), s = 1 for a tuned win, 1/2 a tie, 0 a loss, w = STRONG_WEIGHT for strength 2 else 1. Its CI is
a percentile bootstrap over those pairs (each resampled with both its orders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl

from dpo_eval.data.pairs import one_pair_per_prompt
from dpo_eval.judges.prompt import parse_verdict

STRONG_WEIGHT = 3
WEIGHTING = (f"Arena-Hard's weighting: each order's verdict is one game, a strong verdict (A>>B, B>>A) counted "
             f"{STRONG_WEIGHT} times and a plain one or a tie once; tuned win 1, tie 1/2, loss 0; percentile "
             "bootstrap CI over pairs (2000 resamples)")
THREE = {"a": ("first", 1), "b": ("second", 1), "c": ("tie", 0), "tie": ("tie", 0)}
FIVE = {"a>>b": ("first", 2), "a>b": ("first", 1), "a=b": ("tie", 0), "b>a": ("second", 1), "b>>a": ("second", 2)}
MARK3 = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
FIVE_LABEL = r"A\s*>>\s*B|A\s*>\s*B|A\s*=\s*B|B\s*>>\s*A|B\s*>\s*A"
MARK5 = re.compile(rf"\[\[\s*({FIVE_LABEL})\s*\]\]", re.IGNORECASE)
BARE5 = re.compile(rf"^[\s*_`'\"]*({FIVE_LABEL})[\s*_`'\".]*$", re.IGNORECASE)


@dataclass(frozen=True)
class Reading:
    """What a reply says: verdict (first, second, tie, invalid), strength (2, 1, 0; None where invalid) and the
    rationale (the reasoned style's justification; None for the verdict style and for an invalid reply)."""

    verdict: str
    strength: int | None = None
    rationale: str | None = None


def _key(label: str) -> str:
    return re.sub(r"\s+", "", label).lower()


def read_reply(raw: str | None, style: str = "verdict", levels: int = 3) -> Reading:
    """The Reading of one reply under a judge style and verdict levels (see the module docstring)."""
    text = (raw or "").strip()
    table, mark = (THREE, MARK3) if levels == 3 else (FIVE, MARK5)
    if style == "verdict":
        if levels == 3:
            verdict = parse_verdict(text)
            return Reading(verdict, None if verdict == "invalid" else int(verdict != "tie"))
        found = {_key(label) for label in mark.findall(text)}
        if not found:
            bare = BARE5.match(text.splitlines()[0]) if text else None
            found = {_key(bare.group(1))} if bare else set()
        return Reading(*table[found.pop()]) if len(found) == 1 else Reading("invalid")
    lines = [line for line in text.splitlines() if line.strip()]
    found = {_key(label) for label in mark.findall(lines[-1])} if lines else set()
    if len(found) != 1:
        return Reading("invalid")
    verdict, strength = table[found.pop()]
    return Reading(verdict, strength, "\n".join(lines[:-1]).strip())


def reader(spec):
    """raw -> Reading for a JudgeSpec's style and levels."""
    style, levels = spec.judge_style, spec.verdict_levels
    return lambda raw: read_reply(raw, style, levels)


def style_identity(spec) -> dict:
    """The judge-identity entries of the style and levels: none for the verdict style with three levels (identities
    made before these settings existed stay as they were)."""
    if spec.judge_style == "verdict" and spec.verdict_levels == 3:
        return {}
    return {"judge_style": spec.judge_style, "verdict_levels": spec.verdict_levels}


def weighted_rate(score: np.ndarray, weight: np.ndarray) -> float:
    """sum(w s) / sum(w) over games (NaN without any)."""
    return float((weight * score).sum() / weight.sum()) if weight.sum() > 0 else float("nan")


def weighted_games(judgments: pl.DataFrame, prompts: pl.DataFrame | None = None) -> pl.DataFrame:
    """The games of the weighted win rate for one split's tuned-vs-base judgments: `pair_id, score, weight` per order
    of each pair the win rate counts (one pair per prompt where `prompts` is given; both orders valid)."""
    part = one_pair_per_prompt(judgments, prompts) if prompts is not None else judgments
    bad = part.filter(~pl.col("winner").is_in(["tuned", "base", "tie"]) | pl.col("strength").is_null())
    complete = part.group_by("pair_id").agg(pl.col("order").n_unique()).filter(pl.col("order") == 2)["pair_id"]
    games = part.filter(pl.col("pair_id").is_in(complete.implode())
                        & ~pl.col("pair_id").is_in(bad["pair_id"].implode()))
    return games.select("pair_id", score=pl.when(pl.col("winner") == "tuned").then(1.0)
                        .when(pl.col("winner") == "tie").then(0.5).otherwise(0.0),
                        weight=pl.when(pl.col("strength") == 2).then(float(STRONG_WEIGHT)).otherwise(1.0))


def weighted_block(judgments: pl.DataFrame, prompts: pl.DataFrame | None = None, *, level: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> dict:
    """weighted_win_rate with its percentile bootstrap CI over pairs, the games counted and the strong verdicts
    among them, and the weighting in words, for one split's tuned-vs-base judgments."""
    games = weighted_games(judgments, prompts)
    score, weight = games["score"].to_numpy(), games["weight"].to_numpy()
    rate = weighted_rate(score, weight)
    low = high = float("nan")
    pairs = games["pair_id"].unique(maintain_order=True).to_list()
    if pairs:
        index = games.with_columns(i=pl.col("pair_id").replace_strict(pairs, list(range(len(pairs)))))["i"].to_numpy()
        num = np.bincount(index, score * weight, len(pairs))
        den = np.bincount(index, weight, len(pairs))
        draws = np.random.default_rng(seed).integers(0, len(pairs), (resamples, len(pairs)))
        rates = num[draws].sum(1) / den[draws].sum(1)
        low, high = (float(q) for q in np.quantile(rates, [(1 - level) / 2, (1 + level) / 2]))
    return {"weighted_win_rate": rate, "weighted_ci_low": low, "weighted_ci_high": high,
            "weighted_games": int(games.height), "strong_verdicts": int((weight > 1).sum()), "weighting": WEIGHTING}


def add_weighted(stats: dict, table: pl.DataFrame, prompts: pl.DataFrame | None, *, level: float = 0.95) -> None:
    """Put weighted_block's figures into each split's tuned_vs_base block of judge_summary's `stats`."""
    for split, blocks in (stats.get("splits") or {}).items():
        if "tuned_vs_base" in blocks:
            part = table.filter((pl.col("split") == split) & (pl.col("comparison") == "tuned_vs_base"))
            blocks["tuned_vs_base"].update(weighted_block(part, prompts, level=level))


def settings_block(spec, table: pl.DataFrame) -> dict:
    """summary.json judge entries of this module's settings: style, levels, reply tokens, the weighting (five levels)
    and which judgments had a reference answer."""
    shown = table.filter(pl.col("has_reference"))
    source = (str(spec.references) if spec.references is not None else
              "pairs.parquet reference column" if shown.height else None)
    return {"judge_style": spec.judge_style, "verdict_levels": spec.verdict_levels, "max_tokens": spec.max_tokens,
            **({"weighting": WEIGHTING} if spec.verdict_levels == 5 else {}),
            "references": {"judgments": shown.height, "pairs": shown["pair_id"].n_unique(), "of": table.height,
                           "source": source}}
