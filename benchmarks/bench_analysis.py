"""Analysis speed on a synthetic 12,000-pair x 69-feature table with 2,000 bootstrap resamples.

Times the whole `run_analysis`, and compares its vectorised bootstrap (one matrix product per chunk
of resamples, all features at once) with a plain Python loop over resamples on a few features.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import polars as pl

from dpo_eval.scoring.features import FAMILY_OF
from dpo_eval.stats.analysis import AnalysisSpec, run_analysis
from dpo_eval.stats.paired import bootstrap_means


def synthetic(n_pairs: int, names: list[str], seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_pairs, len(names)))
    frames = []
    for role, shift in (("chosen", 0.3), ("rejected", 0.0), ("tuned", 0.15), ("base", 0.0)):
        values = base + shift + rng.normal(size=base.shape)
        values[rng.random(values.shape) < 0.002] = np.nan  # a few NaNs, as TextDescriptives gives
        frame = pl.DataFrame(values, schema=names)
        frames.append(frame.with_columns(
            pl.Series("pair_id", [f"p{i}" for i in range(n_pairs)]),
            pl.Series("split", ["valid" if i % 10 == 0 else "train" for i in range(n_pairs)]),
            pl.lit(role).alias("role")))
    return pl.concat(frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=12_000)
    parser.add_argument("--bootstrap", type=int, default=2_000)
    parser.add_argument("--loop-features", type=int, default=3)
    args = parser.parse_args()
    names = list(FAMILY_OF)
    features = synthetic(args.pairs, names)

    start = time.perf_counter()
    result = run_analysis(features, AnalysisSpec(bootstrap=args.bootstrap))
    total_s = time.perf_counter() - start

    rng = np.random.default_rng(0)
    d = rng.normal(size=(int(args.pairs * 0.9), len(names)))
    ok = np.ones_like(d, dtype=bool)
    start = time.perf_counter()
    bootstrap_means(d, ok, args.bootstrap, rng)
    vector_per_feature = (time.perf_counter() - start) / len(names)
    start = time.perf_counter()
    for j in range(args.loop_features):
        column = d[:, j]
        [column[rng.integers(0, len(column), len(column))].mean() for _ in range(args.bootstrap)]
    loop_per_feature = (time.perf_counter() - start) / args.loop_features

    print(json.dumps({
        "pairs": args.pairs, "features": len(names), "bootstrap": args.bootstrap,
        "stats_rows": result.stats.height, "analyze_s": round(total_s, 2),
        "bootstrap_vectorised_ms_per_feature": round(vector_per_feature * 1000, 2),
        "bootstrap_loop_ms_per_feature": round(loop_per_feature * 1000, 2),
        "ratio": round(loop_per_feature / vector_per_feature, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
