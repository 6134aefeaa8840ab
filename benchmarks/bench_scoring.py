"""Scoring speed: the plain TextDescriptives path vs score_texts, on the 568 orca texts. Prints JSON."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from dpo_eval.config import ScoringSpec
from dpo_eval.scoring import feature_names, score_texts, score_texts_plain

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/orca_dpo_pairs/validation.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT))
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N texts.")
    args = parser.parse_args()
    records = [json.loads(line) for line in open(args.data, encoding="utf-8")]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    texts = texts[: args.limit] if args.limit else texts
    names = list(feature_names())

    start = time.perf_counter()
    plain = score_texts_plain(texts)
    plain_s = time.perf_counter() - start

    start = time.perf_counter()
    fast = score_texts(texts, ScoringSpec(cache=False))
    fast_s = time.perf_counter() - start

    a, b = fast.select(names).to_numpy(), plain.select(names).to_numpy()
    nan_mismatch = int((np.isnan(a) != np.isnan(b)).sum())
    diff = np.abs(np.nan_to_num(a, nan=0.0) - np.nan_to_num(b, nan=0.0))

    with tempfile.TemporaryDirectory() as cache_dir:
        spec = ScoringSpec(cache_dir=Path(cache_dir))
        score_texts(texts, spec)
        start = time.perf_counter()
        score_texts(texts, spec)
        cached_s = time.perf_counter() - start

    print(json.dumps({
        "texts": len(texts),
        "cores": os.cpu_count(),
        "plain_texts_per_s": round(len(texts) / plain_s, 2),
        "fast_texts_per_s": round(len(texts) / fast_s, 2),
        "ratio": round(plain_s / fast_s, 2),
        "max_abs_diff": float(diff.max()),
        "nan_mismatches": nan_mismatch,
        "cached_texts_per_s": round(len(texts) / cached_s, 1),
        "plain_s": round(plain_s, 2), "fast_s": round(fast_s, 2), "cached_s": round(cached_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
