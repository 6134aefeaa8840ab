"""A reward model's scores added to a run directory: the scores become the feature `reward_model`, the run's
statistics and report are written again with it, and summary.json gains the reward model's calibration.

The scoring itself (dpo_eval.judges.reward_model) knows nothing of run directories or reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl

from dpo_eval.data.prompt_sets import first_turn
from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.reward_model import (
    ACCURACY_METHOD,
    FEATURE,
    SCORES_FILE,
    TRAINING_METADATA,
    TRUNCATION,
    WIN_METHOD,
    RewardScorer,
    add_feature,
    calibration,
    role_items,
    score_roles,
)
from dpo_eval.report.page import Section, read_sections, write_outputs
from dpo_eval.stages import REFERENCE_FEATURES, REFERENCE_PAIRS, run_analysis_spec
from dpo_eval.stats.analysis import run_analysis


def _select(pairs: pl.DataFrame, split: str, limit: int | None) -> pl.DataFrame:
    """The pairs of `split` (all: every split), the first `limit` of them in table order (as `judge` selects)."""
    if split not in ("all", "train", "valid"):
        raise DpoEvalError(f"--split {split}: use train, valid or all")
    if limit is not None and limit < 1:
        raise DpoEvalError(f"--limit {limit}: give a positive number of pairs")
    chosen = pairs if split == "all" else pairs.filter(pl.col("split") == split)
    return chosen.head(limit) if limit else chosen


def _read(run_dir: Path, name: str) -> pl.DataFrame:
    path = run_dir / name
    if not path.is_file():
        raise DpoEvalError(f"{run_dir} has no {name}: give the run directory of `dpo-eval evaluate` (pairs.parquet, "
                           "answers.parquet and features.parquet)")
    return first_turn(pl.read_parquet(path))  # a two-turn set: the reward model scores turn 1


def reward_judge_run(run_dir: Path | str, reward_model: str | Path, *, revision: str | None = None,
                     split: str = "all", limit: int | None = None, batch_size: int = 8,
                     max_length: int | None = None, cache_dir: Path | None = None,
                     scorer: RewardScorer | None = None) -> dict:
    """Score a run's four roles with `reward_model` and add them to it; returns the summary's reward_model block.

    Writes features.parquet with the column `reward_model` (every other column unchanged; NaN for rows
    left out by `split`/`limit`: `limit` keeps the first N selected pairs in pairs.parquet order), reward_scores.parquet
    (the scores with their truncation flags), and, through dpo_eval.report.page.write_outputs, stats.parquet,
    stats.csv, summary.json and the report from the run's own analysis settings (config.json) re-run on
    the new table. The earlier summary keeps its other keys; it gains `reward_model`, and `timings` and
    `cache` gain a `reward_model` entry. A restricted split leaves the other split's scores NaN: S_j of
    the feature needs the train split scored.
    """
    run_dir = Path(run_dir)
    pairs, answers, features = (_read(run_dir, f) for f in ("pairs.parquet", "answers.parquet", "features.parquet"))
    started = time.perf_counter()
    scorer = scorer or RewardScorer(reward_model, revision=revision, batch_size=batch_size, max_length=max_length,
                                    cache_dir=cache_dir)
    items = role_items(_select(pairs, split, limit), answers)
    scores, result = score_roles(scorer, items)
    reference = _score_reference(run_dir, scorer)
    scorer.release()
    seconds = time.perf_counter() - started
    features = add_feature(features, scores)
    _write_atomic(features, run_dir / "features.parquet")
    _write_atomic(scores, run_dir / SCORES_FILE)

    spec = run_analysis_spec(run_dir)
    analysis = run_analysis(features, spec, reference)
    stats = analysis.stats
    block = {"id": scorer.key, "model": scorer.name, "revision": revision, "identity": scorer.identity,
             "max_length": scorer.max_length, "truncation": TRUNCATION,
             "truncated": int(scores["truncated"].sum()), "scored": result.misses, "cached": result.hits,
             "repairs": result.repairs, "accuracy_method": ACCURACY_METHOD, "win_method": WIN_METHOD,
             "splits": calibration(features, seed=spec.seed, n_boot=spec.bootstrap, ci_level=spec.ci_level)}
    mark_in_sample(block["splits"], features, trained_pairs(reward_model))
    if reference is not None:  # questions without labels: the calibration is on the reference's labels
        block["reference_splits"] = calibration(reference, seed=spec.seed, n_boot=spec.bootstrap,
                                                ci_level=spec.ci_level)
    summary_path = run_dir / "summary.json"
    old = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary = old | analysis.summary | {"reward_model": block}
    summary["timings"] = dict(old.get("timings") or {}) | {"reward_model": seconds}
    summary["cache"] = dict(old.get("cache") or {}) | {"reward_model": {"hits": result.hits, "misses": result.misses}}
    summary.pop("sentences", None)  # write_outputs writes them afresh
    sections = [s for s in read_sections(run_dir) if s.id != "reward_model"] + [_section(block)]
    write_outputs(stats, summary, run_dir, sections)
    from dpo_eval.studies.verdict import write_verdict

    write_verdict(run_dir)  # the four answers and the gap read the new scores
    return block


def trained_pairs(reward_model: str | Path) -> set[str] | None:
    """The pair_ids a reward model was trained on, from the metadata `dpo-eval train-reward` writes beside it;
    None where there is none (a hub model, or one trained elsewhere): whether it saw a pair is then unknown."""
    path = Path(reward_model).expanduser() / TRAINING_METADATA
    try:
        return set(json.loads(path.read_text())["train_pair_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mark_in_sample(splits: dict, features: pl.DataFrame, trained: set[str] | None) -> None:
    """Per split, `trained_on` (how many of its scored chosen/rejected pairs the reward model was trained on; None:
    unknown) and `in_sample` (true where any was): an accuracy on pairs it was trained on is not a calibration, and
    no headline reads it."""
    for split, block in splits.items():
        if trained is None:
            block["trained_on"], block["in_sample"] = None, None
            continue
        scored = features.filter((pl.col("split") == split) & (pl.col("role") == "chosen")
                                 & pl.col(FEATURE).is_not_null() & pl.col(FEATURE).is_not_nan())
        block["trained_on"] = len(set(scored["pair_id"].to_list()) & trained)
        block["in_sample"] = block["trained_on"] > 0


def _score_reference(run_dir: Path, scorer: RewardScorer) -> pl.DataFrame | None:
    """The reference data set's features (reference_features.parquet, written by a run on questions without
    labels) with its chosen and rejected scored too; None for a run without a reference."""
    if not (run_dir / REFERENCE_FEATURES).is_file():
        return None
    reference = pl.read_parquet(run_dir / REFERENCE_FEATURES)
    scores, _ = score_roles(scorer, role_items(_read(run_dir, REFERENCE_PAIRS), None))
    reference = add_feature(reference, scores)
    _write_atomic(reference, run_dir / REFERENCE_FEATURES)
    return reference


def _section(block: dict) -> Section:
    blocks = list(block["splits"].items()) + [(f"reference {s}", b)
                                              for s, b in (block.get("reference_splits") or {}).items()]
    rows = [[f"{split} (in-sample: trained on {b['trained_on']})" if b.get("in_sample") else split, b["n"], b["accuracy"], b["ci_low"], b["ci_high"], b["ties"], b["win_n"], b["win_rate"],
             b["win_ci_low"], b["win_ci_high"], b["wins"], b["losses"], b["win_ties"], b["p_value"]]
            for split, b in blocks]
    paragraphs = [
        f"Reward model {block['model']} (id {block['id']}) scored every chosen, rejected, base and tuned answer; "
        "its score is the feature reward_model in the statistics table below.",
        "Calibration first: its accuracy on the data set's own chosen vs rejected pairs. A tuned-vs-base win rate "
        "from a reward model whose accuracy is near 0.5 means little.",
        f"Accuracy: {ACCURACY_METHOD}. Win rate: {WIN_METHOD}.",
        "A split marked in-sample holds pairs the reward model was trained on (its training metadata says so): its "
        "accuracy there says how well it fits them, not how well it judges, and no headline reads it.",
        f"{block['truncated']} scored sequences were longer than its context of {block['max_length']} tokens and "
        f"were cut from the left ({block['truncation']}).",
    ]
    return Section("reward_model", "Reward model", paragraphs,
                   ["split", "n", "accuracy", "ci_low", "ci_high", "ties", "win_n", "win_rate", "win_ci_low",
                    "win_ci_high", "wins", "losses", "win_ties", "p_value"], rows)


def _write_atomic(frame: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
