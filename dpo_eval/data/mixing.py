"""Several preference data sets as one: every pair tagged with its source, pair ids unique across sources,
and a weighted, seeded training mix.

Used by training (`dpo-eval train --dataset A --dataset B [--weights 0.5,0.5]`) and by evaluation
(`dpo-eval evaluate --dataset A --dataset B`: per-source results beside the pooled ones).
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import polars as pl

from dpo_eval.config import DatasetSpec
from dpo_eval.errors import DpoEvalError

SOURCE = "source"


def read_sources(specs: Sequence[DatasetSpec]) -> tuple[pl.DataFrame, list[dict]]:
    """The pairs of every data set in order, with a `source` column (the data set's `source` string), and each
    one's load report. pair_id is a content hash, so a pair found in an earlier data set is the same pair: it
    is kept once, under the first source, and counted (`in_earlier_source`)."""
    from dpo_eval.data.pairs import is_labeled, read_pairs

    names = [spec.source for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DpoEvalError(f"--dataset {twice[0]} is given twice; give each data set once")
    seen: set[str] = set()
    parts, reports, labeled = [], [], []
    for spec in specs:
        pairs, report = read_pairs(spec)
        earlier = pairs["pair_id"].is_in(list(seen))
        pairs = pairs.filter(~earlier)
        if pairs.height == 0:
            raise DpoEvalError(f"--dataset {spec.source}: no pairs left (every pair is left out or already in an "
                               "earlier --dataset); drop it or check its format")
        seen.update(pairs["pair_id"].to_list())
        labeled.append(is_labeled(pairs))
        parts.append(pairs.with_columns(pl.lit(spec.source).alias(SOURCE)))
        reports.append(report.to_dict() | {"in_earlier_source": int(earlier.sum()),
                                           "pairs": {s: int((pairs["split"] == s).sum()) for s in ("train", "valid")},
                                           "total": pairs.height})
    if len(set(labeled)) > 1:
        unlabeled = [name for name, has in zip(names, labeled) if not has]
        raise DpoEvalError(f"--dataset {unlabeled[0]} has no chosen and rejected answers while another --dataset "
                           "has: give preference data sets only, or evaluate the questions in a run of their own")
    return pl.concat(parts, how="diagonal_relaxed"), reports  # a category or a second turn only some sources have


def combined_report(reports: list[dict]) -> dict:
    """One load report for several sources (the shape of LoadReport.to_dict), with each source's own in `sources`."""
    left_out: Counter[str] = Counter()
    for report in reports:
        left_out.update(report["left_out"])
    pairs = {s: sum(r["pairs"][s] for r in reports) for s in ("train", "valid")}
    return {"source": ", ".join(r["source"] for r in reports), "format": ", ".join(r["format"] for r in reports),
            "records": sum(r["records"] for r in reports),
            "duplicates": sum(r["duplicates"] + r["in_earlier_source"] for r in reports),
            "left_out": dict(left_out), "left_out_total": sum(left_out.values()), "pairs": pairs,
            "total": sum(pairs.values()), "sources": reports}


def mix_train(pairs: pl.DataFrame, weights: Sequence[float] | None, seed: int) -> tuple[pl.DataFrame, dict]:
    """The training pairs of a mix of sources, and {source: {weight, available, used}}.

    Without weights: every train pair of every source (their natural shares). With weights w_i (normalised
    to sum 1), source i gives n_i = floor(w_i * N) of its train pairs, N = min_i(available_i / w_i): the
    largest mix with exactly these shares that no source runs out of. Pairs are drawn without replacement
    (no pair is trained on twice per epoch, and no duplicate ids), seeded by (`seed`, source index), and kept
    in their source order. Our own draw rather than datasets.interleave_datasets: that one draws each
    example's source at random, so the shares are only approximate, and we need the ids drawn.
    """
    train = pairs.filter(pl.col("split") == "train")
    sources = list(dict.fromkeys(pairs[SOURCE].to_list()))
    available = {s: int((train[SOURCE] == s).sum()) for s in sources}
    empty = [s for s in sources if available[s] == 0]
    if empty:
        raise DpoEvalError(f"--dataset {empty[0]}: no pairs in its train split, so nothing of it can be trained on")
    if weights is None:
        return train, {s: {"weight": None, "available": available[s], "used": available[s]} for s in sources}
    if len(weights) != len(sources) or any(not np.isfinite(w) or w <= 0 for w in weights):
        raise DpoEvalError(f"--weights: {len(sources)} positive numbers, one per --dataset in order "
                           f"(got {list(weights)})")
    shares = np.asarray(weights, dtype=float) / float(np.sum(weights))
    total = min(available[s] / w for s, w in zip(sources, shares))
    parts, mix = [], {}
    for index, (source, share) in enumerate(zip(sources, shares)):
        n = min(available[source], int(np.floor(share * total + 1e-9)))
        rows = train.filter(pl.col(SOURCE) == source)
        picked = np.sort(np.random.default_rng([seed, index]).choice(rows.height, size=n, replace=False))
        parts.append(rows[picked.tolist()])
        mix[source] = {"weight": float(share), "available": available[source], "used": n}
    return pl.concat(parts), mix


def source_pair_ids(pairs: pl.DataFrame, train: pl.DataFrame) -> dict[str, dict[str, list[str]]]:
    """{source: {train: ids trained on, valid: ids of its valid split}} (train pairs left out of a weighted mix
    are in neither: evaluation counts every pair not trained on as valid)."""
    out = {}
    for source in dict.fromkeys(pairs[SOURCE].to_list()):
        out[source] = {"train": train.filter(pl.col(SOURCE) == source)["pair_id"].to_list(),
                       "valid": pairs.filter((pl.col(SOURCE) == source) & (pl.col("split") == "valid"))["pair_id"]
                       .to_list()}
    return out
