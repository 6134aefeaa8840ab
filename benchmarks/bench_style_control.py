"""The style control's bootstrap: all resamples fitted at once (Newton's method on draw-count weights,
dpo_eval.judges.style.weighted_logistic_fits) against one scikit-learn fit per resample (the plain path, as the
code did before), on planted verdicts of N pairs with four style covariates. Prints JSON: both times, the ratio,
and the largest difference between the two paths' resample rates.

    python benchmarks/bench_style_control.py --pairs 400 --resamples 500
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

from dpo_eval.judges.style import logistic_fit, weighted_logistic_fits


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = np.column_stack([rng.uniform(-0.6, 0.8, n), rng.choice([-1.0, 0.0, 1.0], n, p=[0.2, 0.5, 0.3]),
                         rng.uniform(-1, 1, n), rng.choice([0.0, 0.5, 1.0], n)])
    p = 1 / (1 + np.exp(-(0.2 + d @ np.array([1.0, 0.3, 0.8, -0.2]))))
    y = np.where(rng.random(n) < p, 1.0, 0.0)
    y[rng.random(n) < 0.1] = 0.5
    return y, d / d.std(axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--resamples", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    y, x = planted(args.pairs, args.seed)
    rng = np.random.default_rng(args.seed)
    picks = [rng.integers(0, y.size, y.size) for _ in range(args.resamples)]

    start = time.perf_counter()
    counts = np.stack([np.bincount(p, minlength=y.size) for p in picks]).astype(float)
    params, converged = weighted_logistic_fits(y, x, counts)
    fast_s = time.perf_counter() - start

    start = time.perf_counter()
    plain = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in picks:
            plain.append(logistic_fit(y[p], x[p], tol=1e-6)[0])
    plain_s = time.perf_counter() - start

    print(json.dumps({"pairs": args.pairs, "resamples": args.resamples, "fast_s": round(fast_s, 3),
                      "plain_s": round(plain_s, 3), "speedup": round(plain_s / fast_s, 1),
                      "converged": int(converged.sum()),
                      "max_abs_intercept_diff": float(np.nanmax(np.abs(params[:, 0] - np.array(plain))))}))


if __name__ == "__main__":
    main()
