"""Scoring speed: the plain TextDescriptives path vs score_texts, on the 568 orca texts. Prints JSON.

`per_core_ratio`: score_texts in ONE process against the plain path (what the fast path gains per
core); `ratio`: score_texts on every core against the plain path. The `_cpu` ratios divide CPU time
(time.process_time of this process; both sides run in it) instead of wall time, so they hold on a
shared machine where wall time also measures the neighbours. `max_abs_diff` and `nan_mismatches`
compare both fast runs with the plain path and must be 0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dpo_eval.config import ScoringSpec
from dpo_eval import scoring
from dpo_eval.scoring import feature_names, score_texts, score_texts_plain

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/orca_dpo_pairs/validation.jsonl"


def read_texts(path: str, limit: int | None) -> list[str]:
    """chosen then rejected texts of a preference file (.jsonl or .jsonl.gz with chosen/rejected)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return texts[:limit] if limit else texts


def timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare(fast, plain, names) -> tuple[float, int]:
    a, b = fast.select(names).to_numpy(), plain.select(names).to_numpy()
    nan_mismatch = int((np.isnan(a) != np.isnan(b)).sum())
    diff = np.abs(np.nan_to_num(a, nan=0.0) - np.nan_to_num(b, nan=0.0))
    return float(diff.max()), nan_mismatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT))
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N texts.")
    args = parser.parse_args()
    texts = read_texts(args.data, args.limit)
    names = list(feature_names())
    cores = os.cpu_count() or 1

    # Each run loads its own pipeline (the plain path in its call; the fast path once per process,
    # here cleared before each run, so its workers cannot inherit one from this process either).
    plain, plain_s, plain_cpu = timed(score_texts_plain, texts)
    scoring._pipeline.cache_clear()
    fast, fast_s, _ = timed(score_texts, texts, ScoringSpec(cache=False))
    scoring._pipeline.cache_clear()
    one, one_s, one_cpu = timed(score_texts, texts, ScoringSpec(cache=False, n_process=1))
    diffs = [compare(fast, plain, names), compare(one, plain, names)]

    with tempfile.TemporaryDirectory() as cache_dir:
        spec = ScoringSpec(cache_dir=Path(cache_dir))
        score_texts(texts, spec)
        _, cached_s, _ = timed(score_texts, texts, spec)

    print(json.dumps({
        "data": Path(args.data).name,
        "texts": len(texts),
        "cores": cores,
        "plain_texts_per_s": round(len(texts) / plain_s, 2),
        "one_process_texts_per_s": round(len(texts) / one_s, 2),
        "fast_texts_per_s": round(len(texts) / fast_s, 2),
        "per_core_ratio": round(plain_s / one_s, 2),
        "per_core_ratio_cpu": round(plain_cpu / one_cpu, 2),
        "ratio": round(plain_s / fast_s, 2),
        "max_abs_diff": max(d for d, _ in diffs),
        "nan_mismatches": sum(n for _, n in diffs),
        "cached_texts_per_s": round(len(texts) / cached_s, 1),
        "plain_s": round(plain_s, 2), "one_process_s": round(one_s, 2), "fast_s": round(fast_s, 2),
        "plain_cpu_s": round(plain_cpu, 2), "one_process_cpu_s": round(one_cpu, 2),
        "cached_s": round(cached_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
