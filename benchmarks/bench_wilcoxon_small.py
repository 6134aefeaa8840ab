"""Wilcoxon p-values of small tied samples: dpo_eval.stats.paired.wilcoxon (all sign flips at once) against
scipy.stats.wilcoxon (one statistic call per flip), on what one split of a small run holds: 69 features x
2 comparisons of n tied deltas. Prints JSON with both times, their ratio and the largest p difference.

    .venv/bin/python benchmarks/bench_wilcoxon_small.py [--n 12] [--features 138]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from scipy import stats as sps

from dpo_eval.stats.paired import wilcoxon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=12)
    parser.add_argument("--features", type=int, default=138)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    samples = [np.round(rng.normal(size=args.n), 1) for _ in range(args.features)]  # rounding makes ties
    started = time.perf_counter()
    plain = [sps.wilcoxon(d).pvalue for d in samples]
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    fast = [wilcoxon(d)[1] for d in samples]
    fast_s = time.perf_counter() - started
    print(json.dumps({"n": args.n, "tests": args.features, "scipy_s": round(plain_s, 3), "dpo_eval_s": round(fast_s, 3),
                      "ratio": round(plain_s / fast_s, 1), "max_p_difference": float(np.max(np.abs(np.subtract(plain, fast))))}))


if __name__ == "__main__":
    main()
