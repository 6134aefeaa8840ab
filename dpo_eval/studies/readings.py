"""Reading a finished run's judges for its answers (dpo_eval.studies.verdict) and its panel (dpo_eval.studies.panel):
the files, the per-prompt outcomes of the reward model and an LLM judge, and the held-out blocks an answer rests on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl

from dpo_eval.config import VerdictSpec
from dpo_eval.judges.statistics import LC_SIDE_SHARE
from dpo_eval.data.prompt_sets import first_turn
from dpo_eval.stats.paired import wilson

RM = "reward model"
SEPARATION = "complete separation"  # the start of judges.statistics.lc_win_rate's reason where length decides all


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _table(run_dir: Path, name: str) -> pl.DataFrame | None:
    path = run_dir / name
    return first_turn(pl.read_parquet(path)) if path.is_file() else None  # a two-turn set's verdict reads turn 1


def _num(x) -> float:
    """A figure read from summary.json as a float: NaN where it is missing or null (written for a NaN)."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _pct(x) -> str:
    x = _num(x)
    return f"{x:.2f}" if math.isfinite(x) else "n/a"


def reward_outcomes(scores: pl.DataFrame, split: str) -> pl.DataFrame:
    """`pair_id, split, winner` (tuned, base or tie) of the reward model on `split` (all: every split)."""
    part = scores if split == "all" else scores.filter(pl.col("split") == split)
    part = part.filter(pl.col("role").is_in(["tuned", "base"]) & pl.col("reward_model").is_finite())  # NaN: unscored
    wide = part.pivot(on="role", index=["pair_id", "split"], values="reward_model")
    if not {"tuned", "base"} <= set(wide.columns):  # no tuned or no base answer scored on this split
        return pl.DataFrame(schema={"pair_id": pl.String, "split": pl.String, "winner": pl.String})
    wide = wide.drop_nulls(["tuned", "base"])
    winner = (pl.when(pl.col("tuned") > pl.col("base")).then(pl.lit("tuned"))
              .when(pl.col("tuned") < pl.col("base")).then(pl.lit("base")).otherwise(pl.lit("tie")))
    return wide.select("pair_id", "split", winner=winner)


def once_per_prompt(outcomes: pl.DataFrame, run_dir: Path) -> pl.DataFrame:
    """One row per prompt of a `pair_id, ...` frame, prompts read from the run's pairs.parquet."""
    from dpo_eval.data.pairs import one_pair_per_prompt, prompt_table

    pairs = _table(run_dir, "pairs.parquet")
    kept = one_pair_per_prompt(outcomes, prompt_table(pairs) if pairs is not None else None)
    return kept.sort("pair_id")  # in pair_id order, as the report's list of disagreements was


def judge_outcomes(judgments: pl.DataFrame, split: str) -> pl.DataFrame:
    """`pair_id, split, winner` of the LLM judge's tuned-vs-base pairs counted in n (both orders valid)."""
    from dpo_eval.judges.statistics import combine_orders

    part = judgments.filter(pl.col("comparison") == "tuned_vs_base")
    if split != "all":
        part = part.filter(pl.col("split") == split)
    if part.height == 0:
        return pl.DataFrame(schema={"pair_id": pl.String, "split": pl.String, "winner": pl.String})
    combined = combine_orders(part)
    return combined.filter(pl.col("winner").is_in(["tuned", "base", "tie"])).select("pair_id", "split", "winner")


def _lc_usable(block: dict) -> tuple[bool | None, str]:
    """(does the length-controlled rate lie above 0.5: True, below: False, cannot say: None; the words for it).

    An extrapolation (length differences on one side of equal) says nothing. Where tuned wins (or loses) every
    pair with lengths on both sides of equal, the fit has no finite solution but length cannot explain the result:
    it counts as above (below). Where length alone separates wins from losses, length explains every verdict."""
    rate, extrapolated, reason = block.get("lc_win_rate"), block.get("lc_extrapolated"), block.get("lc_reason") or ""
    spread = block.get("length_diff") or {}
    if extrapolated:
        return None, "its length-controlled rate is an extrapolation (the answers' length differences lie on one side)"
    if rate is not None and math.isfinite(rate):
        return rate > 0.5, f"length-controlled rate {_pct(rate)}"
    if reason.startswith(SEPARATION):
        return None, "its length-controlled rate is undefined because length alone separates wins from losses"
    if spread and block.get("wins", 0) + block.get("losses", 0) > 0 and (block.get("losses") == 0 or block.get("wins") == 0):
        sides = min(spread["share_tuned_longer"], spread["share_tuned_shorter"]) + spread["share_equal"]
        if sides >= LC_SIDE_SHARE:
            won = block.get("losses") == 0
            return won, (f"tuned {'wins' if won else 'loses'} every pair, with lengths on both sides of equal "
                         "(no length-controlled fit needed)")
    return None, f"its length-controlled rate is undefined ({reason or 'not computed'})"


def _at_level(k: float, n: int, spec: VerdictSpec) -> tuple[float, float]:
    """The Wilson interval of k successes (a tie half of one) in n at the verdict's level 1 - alpha (the stages
    store theirs at their own level)."""
    return wilson(k, n, 1 - spec.alpha) if n else (math.nan, math.nan)


def _held_out_split(splits: dict, in_sample: dict | None = None) -> str | None:
    """The split a judge's answer rests on: valid, else train; never one the judge was trained on (in_sample)."""
    for split in ("valid", "train"):
        if split in splits and not (in_sample or {}).get(split):
            return split
    return None


def llm_judge_blocks(summary: dict, spec: VerdictSpec) -> tuple[dict, dict, str] | None:
    """(calibration, tuned-vs-base block, split) of the LLM judge, or None where it judged no held-out pair of
    both comparisons."""
    splits = (summary.get("judge") or {}).get("splits") or {}
    usable = {s: b for s, b in splits.items() if "tuned_vs_base" in b and "chosen_vs_rejected" in b}
    split = _held_out_split(usable)
    if split is None:
        return None
    c, w = usable[split]["chosen_vs_rejected"], usable[split]["tuned_vs_base"]
    calibration = {"agreement": c["agreement"], "n": c["n"]}
    calibration["ci_low"], calibration["ci_high"] = _at_level(_num(c["agreement"]) * c["n"] if c["n"] else 0,
                                                              c["n"], spec)
    low, high = _at_level(w["wins"] + w["ties"] / 2, w["n"], spec) if "wins" in w else (math.nan, math.nan)
    return calibration, {"split": split, **w, "ci_low": low, "ci_high": high}, split
