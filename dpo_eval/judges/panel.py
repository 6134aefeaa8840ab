"""A panel of judges on one run: several LLM judges (and the reward model) each keep their own verdicts; their
pairwise agreement and a majority verdict over the calibrated ones.

Layout. judgments.parquet holds every LLM judge's rows, told apart by its `judge` column (the judge id,
`kind:model:digest`); a judge run replaces the rows of its own panel member only (`member`: the id without its digest,
so a re-run of one model with a changed template or decoding replaces its earlier verdicts, and another model's
rows stay). summary.json's `judges` is {member: judge block}; `judge` stays the latest run's block, and every reader
of one judge's rows filters judgments.parquet to `judge.id` (`own_rows`).

Statistics, over one verdict per prompt of tuned vs base (tuned, base or tie; both orders combined for an LLM
judge, the score's sign for the reward model):

- agreement of two judges: Cohen's kappa = (p_o - p_e) / (1 - p_e) on the prompts both judged, with a percentile
  bootstrap CI over prompts (`kappa_ci`);
- the majority: per prompt, the verdict most of the calibrated judges name; where no verdict has more votes than
  every other (e.g. two judges that disagree) the prompt is a tie, as two orders that disagree are; its win rate
  (wins + ties / 2) / n with a Wilson CI.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.stats.paired import wilson

OUTCOMES = ("tuned", "base", "tie")
CI_METHOD = ("percentile bootstrap over prompts (prompts drawn with replacement, numpy default_rng(seed).integers, "
             "kappa of each resample; a resample where both judges name one and the same verdict throughout "
             "counts as kappa 1)")
MAJORITY_RULE = ("per prompt, the verdict (tuned, base, tie) named by more calibrated judges than any other; a prompt "
                 "without such a verdict (the votes split evenly) is a tie; prompts judged by every calibrated judge "
                 "only")
WIN_CI_METHOD = "Wilson score interval on k = wins + ties/2 of the n prompts"


def member(judge_id: str) -> str:
    """The panel member of a judge id `kind:model:digest`: `kind:model` (a model may hold colons itself)."""
    return judge_id.rsplit(":", 1)[0] if judge_id.count(":") >= 2 else judge_id


def panel_ids(summary: dict) -> set[str]:
    """The judge ids summary.json names (its `judges` blocks and its `judge`): the rows judgments.parquet keeps."""
    blocks = [*(summary.get("judges") or {}).values(), summary.get("judge") or {}]
    return {b["id"] for b in blocks if isinstance(b, dict) and b.get("id")}


def merge_judgments(path: Path, table: pl.DataFrame, judge_id: str, keep: set[str]) -> pl.DataFrame:
    """`table` (the rows of judge `judge_id`, perhaps none) written to `path` beside the rows already there of the
    other panel members among the judge ids `keep` (panel_ids: rows of a judge the summary no longer names, e.g. of
    an earlier evaluation into the same folder, go); the rows of `judge_id`'s own member are replaced. Returns the
    whole table written."""
    path = Path(path)
    if path.is_file():
        earlier = pl.read_parquet(path)
        if "judge" in earlier.columns:
            others = earlier.filter(pl.col("judge").is_in(sorted(keep))
                                    & (pl.col("judge").map_elements(member, return_dtype=pl.String) != member(judge_id)))
            if others.height:
                table = pl.concat([table, others], how="diagonal_relaxed")
    table.write_parquet(path)
    return table


def own_rows(judgments: pl.DataFrame | None, judge_id: str | None) -> pl.DataFrame | None:
    """The rows of judge `judge_id` (all rows where it is None or the table has one judge only)."""
    if judgments is None or judge_id is None or "judge" not in judgments.columns:
        return judgments
    return judgments.filter(pl.col("judge") == judge_id)


def record_judge(summary: dict, block: dict) -> dict:
    """summary.json with `judge` = `block` and `judges`[member] = `block`; a run judged before panels existed keeps
    its earlier judge there too (from its `judge`)."""
    judges = dict(summary.get("judges") or {})
    earlier = summary.get("judge")
    if not judges and isinstance(earlier, dict) and earlier.get("id"):
        judges[member(earlier["id"])] = earlier
    judges[member(block["id"])] = block
    return summary | {"judge": block, "judges": judges}


def kappa_of_counts(counts: np.ndarray) -> np.ndarray:
    """Cohen's kappa of confusion tables `counts` (... x L x L): (p_o - p_e) / (1 - p_e), p_o the diagonal share, p_e
    the sum over labels of the two raters' marginal shares multiplied; 1 where p_e = 1 (both raters name one and the
    same label throughout), NaN without items."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.trace(counts, axis1=-2, axis2=-1) / n
        p_e = (counts.sum(axis=-1) * counts.sum(axis=-2)).sum(axis=-1) / n ** 2
        kappa = (p_o - p_e) / (1 - p_e)
    return np.where(np.isclose(p_e, 1.0) & (n > 0), 1.0, kappa)


def kappa_ci(a: list[str], b: list[str], level: float = 0.95, resamples: int = 2000, seed: int = 0,
             chunk: int = 250) -> tuple[float, float, float]:
    """(kappa, ci_low, ci_high) of two judges' verdicts on the same prompts (a[i], b[i] of prompt i): Cohen's kappa and
    its percentile bootstrap CI at `level` over `resamples` resamples of the prompts (numpy default_rng(seed), the
    draws of resample r being integers(0, n, n) in turn). NaN without prompts."""
    if len(a) != len(b):
        raise ValueError("kappa_ci: the two judges' verdicts cover different numbers of prompts")
    n = len(a)
    if n == 0:
        return math.nan, math.nan, math.nan
    labels = sorted(set(a) | set(b))
    width = len(labels)
    code = np.array([labels.index(x) * width + labels.index(y) for x, y in zip(a, b)])
    kappa = float(kappa_of_counts(np.bincount(code, minlength=width * width).reshape(width, width)))
    rng = np.random.default_rng(seed)
    kappas = np.empty(resamples)
    for start in range(0, resamples, chunk):  # chunks keep memory at chunk x n; the draws are those of one call
        draw = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        picked = code[draw]
        counts = np.stack([(picked == c).sum(axis=1) for c in range(width * width)], axis=1)
        kappas[start:start + draw.shape[0]] = kappa_of_counts(counts.reshape(-1, width, width))
    tail = (1 - level) / 2
    low, high = np.quantile(kappas, [tail, 1 - tail])
    return kappa, float(low), float(high)


def agreement_rows(verdicts: dict[str, pl.DataFrame], *, level: float, resamples: int, seed: int) -> list[dict]:
    """Per pair of judges (in the order of `verdicts`): a, b, n (prompts both judged), agree (share naming the same
    verdict), kappa with its CI. `verdicts`: {name: `pair_id, split, winner`}."""
    rows = []
    for (name_a, frame_a), (name_b, frame_b) in itertools.combinations(verdicts.items(), 2):
        both = frame_a.join(frame_b, on=["pair_id", "split"], suffix="_b").sort("pair_id")
        a, b = both["winner"].to_list(), both["winner_b"].to_list()
        kappa, low, high = kappa_ci(a, b, level, resamples, seed)
        rows.append({"a": name_a, "b": name_b, "n": both.height,
                     "agree": float(np.mean(np.array(a) == np.array(b))) if a else math.nan,
                     "kappa": kappa, "ci_low": low, "ci_high": high})
    return rows


def majority(verdicts: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """`pair_id, split, winner, votes` of the judges in `verdicts` on the prompts all of them judged: winner the verdict
    named by more judges than any other, else tie (MAJORITY_RULE); votes like "tuned 2, base 1"."""
    names = list(verdicts)
    wide = None
    for i, name in enumerate(names):
        frame = verdicts[name].select("pair_id", "split", pl.col("winner").alias(f"w{i}"))
        wide = frame if wide is None else wide.join(frame, on=["pair_id", "split"])
    rows = []
    for row in wide.sort("pair_id").iter_rows(named=True):
        said = [row[f"w{i}"] for i in range(len(names))]
        tally = {o: said.count(o) for o in OUTCOMES if said.count(o)}
        top = max(tally.values())
        leaders = [o for o, c in tally.items() if c == top]
        rows.append({"pair_id": row["pair_id"], "split": row["split"],
                     "winner": leaders[0] if len(leaders) == 1 else "tie",
                     "votes": ", ".join(f"{o} {c}" for o, c in tally.items())})
    return pl.DataFrame(rows, schema={"pair_id": pl.String, "split": pl.String, "winner": pl.String,
                                      "votes": pl.String})


def win_block(outcomes: pl.DataFrame, level: float) -> dict:
    """n, wins, losses, ties, win_rate = (wins + ties / 2) / n and its Wilson CI of per-prompt winners."""
    winner = outcomes["winner"]
    wins, losses, ties = (int((winner == o).sum()) for o in OUTCOMES)
    n = wins + losses + ties
    low, high = wilson(wins + ties / 2, n, level) if n else (math.nan, math.nan)
    return {"n": n, "wins": wins, "losses": losses, "ties": ties,
            "win_rate": (wins + ties / 2) / n if n else math.nan, "ci_low": low, "ci_high": high}
