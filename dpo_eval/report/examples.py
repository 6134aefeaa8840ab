"""The report's examples: a handful of pairs with the prompt and the four answers side by side.

Chosen are the pairs where tuned and base differ most on the features tuned moved most (the sum over
those features of |tuned - base| / the std of tuned - base over pairs), and a few more at random with a
fixed seed, so the page shows typical answers as well as the extremes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

ROLES = ("chosen", "rejected", "base", "tuned")
CHARS = 1500  # characters of each text shown; the rest is cut and said so


def top_features(stats: pl.DataFrame, alpha: float, k: int = 4) -> list[str]:
    """The k features tuned moved most: smallest tuned-vs-base q over the splits, then largest |effect size|."""
    tb = stats.filter(pl.col("comparison") == "tuned_vs_base").with_columns(
        pl.col("q_value").cast(pl.Float64).fill_nan(None).fill_null(2.0).alias("_q"),
        pl.col("effect_size").cast(pl.Float64).fill_nan(None).abs().fill_null(0.0).alias("_e"))
    best = tb.group_by("feature").agg(pl.col("_q").min(), pl.col("_e").max()).sort(["_q", "_e", "feature"],
                                                                                      descending=[False, True, False])
    return best["feature"].head(k).to_list()


def _cut(text) -> dict:
    if text is None:
        return {"text": None, "cut": False}
    text = str(text)
    return {"text": text[:CHARS], "cut": len(text) > CHARS}


def _value(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def select_pairs(features: pl.DataFrame, top: list[str], n_top: int, n_random: int, seed: int) -> list[tuple[str, str]]:
    """[(pair_id, why)]: the n_top pairs where tuned and base differ most on `top`, then n_random others."""
    base = features.filter(pl.col("role") == "base").select(["pair_id"] + top)
    tuned = features.filter(pl.col("role") == "tuned").select(["pair_id"] + top)
    both = base.join(tuned, on="pair_id", suffix="_tuned").sort("pair_id")
    if both.height == 0:
        return []
    distance = np.zeros(both.height)
    for f in top:
        d = both[f + "_tuned"].cast(pl.Float64).to_numpy() - both[f].cast(pl.Float64).to_numpy()
        spread = np.nanstd(d) if np.isfinite(d).sum() > 1 else 0.0
        distance += np.nan_to_num(np.abs(d) / spread if spread > 0 else np.zeros_like(d))
    ids = both["pair_id"].to_list()
    order = np.argsort(-distance, kind="stable")[:n_top]
    chosen = [(ids[i], "tuned and base differ most here on the top features") for i in order]
    rest = [p for p in ids if p not in {c[0] for c in chosen}]
    picks = np.random.default_rng(seed).choice(len(rest), size=min(n_random, len(rest)), replace=False)
    return chosen + [(rest[i], f"a random pair (seed {seed})") for i in sorted(picks)]


def examples(run_dir: Path, stats: pl.DataFrame, alpha: float, n_top: int = 3, n_random: int = 3,
             seed: int = 0) -> dict | None:
    """The examples block of the page from run_dir's pairs, answers and features; None without those files."""
    files = {name: Path(run_dir) / f"{name}.parquet" for name in ("pairs", "answers", "features")}
    if not all(p.is_file() for p in files.values()):
        return None
    pairs, answers, features = (pl.read_parquet(p) for p in files.values())
    top = [f for f in top_features(stats, alpha) if f in features.columns]
    picked = select_pairs(features, top, n_top, n_random, seed)
    text = {(r["pair_id"], r["model"]): r["answer"] for r in answers.select("pair_id", "model", "answer").iter_rows(named=True)}
    values = {(r["pair_id"], r["role"]): r for r in features.select(["pair_id", "role"] + top).iter_rows(named=True)}
    by_id = {r["pair_id"]: r for r in pairs.iter_rows(named=True)}
    shown = []
    for pair_id, why in picked:
        pair = by_id.get(pair_id, {})
        cells = []
        for role in ROLES:
            body = pair.get(role) if role in ("chosen", "rejected") else text.get((pair_id, role))
            row = values.get((pair_id, role))
            cells.append({"role": role, **_cut(body),
                          "values": [(f, _value(row[f])) for f in top] if row else []})
        shown.append({"pair_id": pair_id, "split": pair.get("split"), "why": why, "system": _cut(pair.get("system")),
                      "prompt": _cut(pair.get("prompt")), "answers": cells})
    return {"features": top, "pairs": shown, "chars": CHARS}
