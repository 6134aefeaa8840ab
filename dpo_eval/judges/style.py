"""Style-controlled win rate: the judge's preference for tuned over base with length and markdown held equal.

Arena-Hard v2's style control, for two systems. Per answer: its length (tokens), and its counts of markdown
headers (lines starting with 1-6 `#` and a space), list items (lines starting with `-`, `*`, `+` or `N.` and a
space) and bold spans (`**...**` or `__...__`). Per valid pair, each covariate's difference is normalised by the
pair's sum, (tuned - base) / (tuned + base) (0 where both are 0), then divided by its standard deviation over
the pairs (ddof 0; scaled, not centred, so 0 is still "the same style": Arena-Hard centres as well, which for a
symmetric many-model arena changes little but for tuned vs base would move the prediction to the average style
difference, the very thing to control for). A covariate without variation is left out and named.

The combined per-pair outcome (tuned win 1, loss 0, tie 1/2 as one row of each outcome with weight 1/2, the rows
the win rate counts) is fitted by unpenalised logistic regression on the scaled covariates plus an intercept; the
style-controlled rate is sigmoid(intercept), the prediction at equal style, and each coefficient is the change in
log-odds of a tuned win per standard deviation of that covariate. Its CI is a percentile bootstrap over pairs.
Where (nearly) every pair's difference in some covariate has one sign, equal style lies outside the data: the
rate is flagged as an extrapolation, as the length-controlled rate is.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import polars as pl

COVARIATES = ("length", "headers", "lists", "bold")
HEADER = re.compile(r"^\s{0,3}#{1,6}\s", re.MULTILINE)
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s", re.MULTILINE)
BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__", re.DOTALL)
SC_RESAMPLES = 500
SEPARATED = 12.0  # |log-odds per sd| beyond this: a covariate separates the verdicts (the fit runs off to infinity)
SIDE_SHARE = 0.1  # as the length control's LC_SIDE_SHARE: fewer pairs than this at or on one side of 0: extrapolated
METHOD = ("Arena-Hard-style control: logistic regression (unpenalised) of the combined per-pair outcome on the "
          "pair-normalised differences (tuned - base) / (tuned + base) of length and of markdown headers, list "
          "items and bold spans, each scaled by its sd (not centred), plus an intercept; the rate is the prediction "
          "at equal style; coefficients in log-odds per sd; percentile bootstrap CI over pairs")


def style_counts(text: str | None) -> dict[str, int]:
    """Markdown headers, list items and bold spans of one answer."""
    text = text or ""
    return {"headers": len(HEADER.findall(text)), "lists": len(LIST_ITEM.findall(text)),
            "bold": len(BOLD.findall(text))}


def style_frame(answers: pl.DataFrame, pairs: pl.DataFrame, lengths: pl.DataFrame | None) -> pl.DataFrame:
    """`pair_id, split, role, length, headers, lists, bold` of the base and tuned answers (length from `lengths`,
    answer_lengths' frame; the answer's characters where it has none)."""
    part = answers.filter(pl.col("model").is_in(["base", "tuned"])).join(pairs.select("pair_id", "split"),
                                                                         on="pair_id")
    rows = [{"pair_id": r["pair_id"], "split": r["split"], "role": r["model"], "chars": float(len(r["answer"] or "")),
             **style_counts(r["answer"])} for r in part.iter_rows(named=True)]
    frame = pl.DataFrame(rows, schema={"pair_id": pl.String, "split": pl.String, "role": pl.String,
                                       "chars": pl.Float64, "headers": pl.Int64, "lists": pl.Int64, "bold": pl.Int64})
    if lengths is not None:
        frame = frame.join(lengths.select("pair_id", "split", "role", "length"), on=["pair_id", "split", "role"],
                           how="left")
        frame = frame.with_columns(pl.col("length").fill_null(pl.col("chars")))
    else:
        frame = frame.with_columns(length=pl.col("chars"))
    return frame.drop("chars")


def style_differences(styles: pl.DataFrame) -> pl.DataFrame:
    """`pair_id, split` and, per covariate, (tuned - base) / (tuned + base) (0 where both are 0)."""
    tuned = styles.filter(pl.col("role") == "tuned").drop("role")
    base = styles.filter(pl.col("role") == "base").drop("role")
    both = tuned.join(base, on=["pair_id", "split"], suffix="_base")
    exprs = []
    for c in COVARIATES:
        t, b = pl.col(c).cast(pl.Float64), pl.col(f"{c}_base").cast(pl.Float64)
        exprs.append(pl.when((t + b) == 0).then(0.0).otherwise((t - b) / (t + b)).alias(c))
    return both.select("pair_id", "split", *exprs)


def unpenalised() -> dict:
    """LogisticRegression's arguments for no penalty: scikit-learn 1.8 deprecated penalty=None in favour of C=inf
    (removal in 1.10); both mean no penalty."""
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    return {"C": np.inf} if (major, minor) >= (1, 8) else {"penalty": None}


def logistic_fit(y: np.ndarray, x: np.ndarray, *, intercept: bool = True, tol: float = 1e-10,
                 max_iter: int = 1000) -> tuple[float, np.ndarray, bool]:
    """(intercept, coefficients, converged) of the unpenalised logistic fit of outcomes y (1, 0, or 1/2 for a tie,
    entered as one row of each outcome with weight 1/2) on x; the intercept is 0 without one."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    X = np.concatenate([x, x])
    Y = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    W = np.concatenate([y, 1 - y])
    keep = W > 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(fit_intercept=intercept, max_iter=max_iter, tol=tol, **unpenalised()).fit(
            X[keep], Y[keep], sample_weight=W[keep])
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return (float(model.intercept_[0]) if intercept else 0.0), model.coef_[0].astype(float), converged


def weighted_logistic_fits(y: np.ndarray, x: np.ndarray, weights: np.ndarray, *, intercept: bool = True,
                           max_iter: int = 100, tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Many unpenalised logistic fits at once, one per row of `weights` (fits x rows, non-negative: a bootstrap
    resample is its rows' draw counts, which gives the same likelihood as the resampled rows themselves), of
    outcomes y (1, 0, or 1/2 for a tie as a half row of each outcome) on x, by Newton's method on all fits
    together. Returns (params, converged): params is fits x (1 + covariates) with the intercept first (0 without
    one). A fit whose Hessian is singular (a covariate without variation in its rows) or that runs off (separation)
    is not converged; its parameters are NaN."""
    y, x, w = np.asarray(y, dtype=float), np.asarray(x, dtype=float), np.asarray(weights, dtype=float)
    n = y.size
    X = np.concatenate([np.ones((n, 1)), x], axis=1) if intercept else x
    k = X.shape[1]
    beta = np.zeros((w.shape[0], k))
    active = np.ones(w.shape[0], dtype=bool)
    converged = np.zeros(w.shape[0], dtype=bool)
    for _ in range(max_iter):
        b, wa = beta[active], w[active]
        with np.errstate(over="ignore"):
            mu = 1.0 / (1.0 + np.exp(-(b @ X.T)))
        gradient = (wa * (y - mu)) @ X
        hessian = np.einsum("fn,ni,nj->fij", wa * mu * (1.0 - mu), X, X)
        singular = np.linalg.cond(hessian) > 1e12
        hessian[singular] = np.eye(k)  # solved harmlessly, then dropped
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        idx = np.flatnonzero(active)
        beta[idx] = b + step
        bad = singular | ~np.isfinite(step).all(axis=1) | (np.abs(beta[idx]).max(axis=1) > 1e3)
        done = ~bad & (np.abs(step).max(axis=1) < tol)
        converged[idx[done]] = True
        beta[idx[bad]] = np.nan
        active[idx[bad | done]] = False
        if not active.any():
            break
    beta[active] = np.nan  # out of iterations
    if not intercept:
        beta = np.concatenate([np.zeros((beta.shape[0], 1)), beta], axis=1)
    return beta, converged


def _sigmoid(a: float) -> float:
    return float(1.0 / (1.0 + np.exp(-a)))


def _bootstrap_rates(y: np.ndarray, x: np.ndarray, resamples: int, seed: int) -> list[float]:
    """sigmoid(intercept) of each bootstrap resample's fit (rows drawn with replacement, `resamples` draws from
    `seed`), skipping a resample with one outcome only and one whose fit separates (|coefficient| > SEPARATED).
    All resamples are fitted at once (weighted_logistic_fits); a resample whose joint fit does not converge
    (separation, or a covariate without variation in it, which then drops out) is refitted alone as before."""
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, y.size, y.size) for _ in range(resamples)]
    usable = [p for p in picks if not np.all(y[p] == y[p][0])]  # one outcome only: no fit on this resample
    if not usable:
        return []
    counts = np.stack([np.bincount(p, minlength=y.size) for p in usable]).astype(float)
    params, converged = weighted_logistic_fits(y, x, counts)
    rates = []
    for pick, fit, ok in zip(usable, params, converged):
        xb = x[pick]
        varies = xb.std(axis=0) > 0
        if not (ok and varies.all()):  # refitted alone: a covariate without variation in this resample drops out
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a, coefs, _ = logistic_fit(y[pick], xb[:, varies], tol=1e-6)
            fit, ok = np.concatenate([[a], coefs]), True
        if ok and np.abs(fit[1:]).max(initial=0.0) <= SEPARATED:
            rates.append(_sigmoid(fit[0]))
    return rates


def sc_win_rate(outcome: np.ndarray, diffs: np.ndarray, names: tuple[str, ...] = COVARIATES, *,
                resamples: int = SC_RESAMPLES, seed: int = 0, level: float = 0.95) -> dict:
    """The style-controlled block of one split: sc_win_rate, sc_ci_low, sc_ci_high, sc_coefficients {covariate:
    log-odds per sd}, sc_left_out (covariates without variation), sc_extrapolated, sc_reason (empty when the
    fit is regular), sc_n. `diffs` is pairs x covariates (style_differences' columns), `outcome` 1 / 0 / 1/2."""
    y, d = np.asarray(outcome, dtype=float), np.asarray(diffs, dtype=float)
    ok = np.isfinite(y) & np.isfinite(d).all(axis=1)
    y, d = y[ok], d[ok]
    empty = {"sc_win_rate": float("nan"), "sc_ci_low": float("nan"), "sc_ci_high": float("nan"),
             "sc_coefficients": {}, "sc_left_out": [], "sc_extrapolated": None, "sc_n": int(y.size)}
    if y.size < 3:
        return empty | {"sc_reason": "fewer than 3 valid pairs with both answers' texts"}
    if np.all(y == 1) or np.all(y == 0):
        return empty | {"sc_reason": f"every valid pair is a {'win' if y[0] == 1 else 'loss'} for tuned: no finite fit"}
    sd = d.std(axis=0)
    used = [i for i in range(d.shape[1]) if sd[i] > 0]
    left_out = [names[i] for i in range(d.shape[1]) if sd[i] == 0]
    x = d[:, used] / sd[used] if used else np.zeros((y.size, 0))
    sides = [min(float((x[:, j] >= 0).mean()), float((x[:, j] <= 0).mean())) for j in range(x.shape[1])]
    extrapolated = any(s < SIDE_SHARE for s in sides)
    if x.shape[1] == 0:
        rate = float(y.mean())
        return empty | {"sc_win_rate": rate, "sc_left_out": left_out, "sc_extrapolated": False,
                        "sc_reason": "no style covariate varies: the rate is the raw win rate"}
    intercept, coefs, converged = logistic_fit(y, x)
    if not converged or np.abs(coefs).max() > SEPARATED:
        return empty | {"sc_left_out": left_out, "sc_coefficients": {names[i]: float(c) for i, c in zip(used, coefs)},
                        "sc_reason": "separation: the style covariates decide (nearly) every verdict, so the rate at "
                                     "equal style has no finite estimate"}
    notes = []
    if extrapolated:
        worst = [names[used[j]] for j, s in enumerate(sides) if s < SIDE_SHARE]
        notes.append(f"an extrapolation: nearly every pair differs in the same direction in {', '.join(worst)}, so "
                     "equal style lies outside the data; do not read it as the judge's preference")
    rates = _bootstrap_rates(y, x, resamples, seed)
    tail = (1 - level) / 2
    low, high = (np.quantile(rates, [tail, 1 - tail]) if len(rates) >= resamples // 2 else (np.nan, np.nan))
    if len(rates) < resamples:
        notes.append(f"{resamples - len(rates)} of {resamples} resamples had no fit and were left out")
    return {"sc_win_rate": _sigmoid(intercept), "sc_ci_low": float(low), "sc_ci_high": float(high),
            "sc_coefficients": {names[i]: float(c) for i, c in zip(used, coefs)}, "sc_left_out": left_out,
            "sc_extrapolated": bool(extrapolated), "sc_reason": "; ".join(notes), "sc_n": int(y.size)}


def split_sc_win_rate(combined: pl.DataFrame, diffs: pl.DataFrame | None, **options) -> dict:
    """sc_win_rate's block over the valid tuned-vs-base pairs of one split (`combined`: combine_orders' rows),
    style differences joined by pair; an empty block with the reason where there are no answer texts."""
    if diffs is None:
        return {"sc_win_rate": float("nan"), "sc_ci_low": float("nan"), "sc_ci_high": float("nan"),
                "sc_coefficients": {}, "sc_left_out": [], "sc_extrapolated": None, "sc_n": 0,
                "sc_reason": "no answer texts given"}
    rows = combined.filter(pl.col("winner").is_in(["tuned", "base", "tie"])).join(diffs, on=["pair_id", "split"],
                                                                                 how="left")
    outcome = np.where(rows["winner"] == "tuned", 1.0, np.where(rows["winner"] == "tie", 0.5, 0.0))
    x = rows.select(*COVARIATES).to_numpy().astype(float) if rows.height else np.zeros((0, len(COVARIATES)))
    return sc_win_rate(outcome, x, **options)
