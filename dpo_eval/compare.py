"""A/B comparison of two evaluated systems on the same prompts: does B write differently from A, and in
the direction of chosen over rejected?

A side is a run directory's tuned answers (`RUN` or `RUN:tuned`) or its base answers (`RUN:base`). The
pairs both sides answered are matched by pair_id; the comparison's features table puts A's side in the
role `base` and B's side in the role `tuned`, with chosen and rejected (and the split) from run A, so the
whole paired analysis applies unchanged: d = B - A beside d_cr = chosen - rejected, S_j the std of A's
train d_cr. Comparing RUN:base with RUN reproduces that run's own tuned-vs-base statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dpo_eval.config import AnalysisSpec
from dpo_eval.errors import DpoEvalError

SIDES = ("tuned", "base")
NEEDED = ("pairs.parquet", "features.parquet")


@dataclass(frozen=True)
class Side:
    run: Path
    role: str

    @property
    def label(self) -> str:
        return f"{self.run}:{self.role}"


def parse_side(text: str) -> Side:
    """`RUN` (its tuned answers), `RUN:tuned` or `RUN:base`, checked to be a run directory with features."""
    run, _, role = str(text).rpartition(":") if str(text).endswith((":base", ":tuned")) else (str(text), "", "tuned")
    side = Side(Path(run), role)
    missing = [name for name in NEEDED if not (side.run / name).is_file()]
    if missing:
        raise DpoEvalError(f"{side.run}: not a dpo-eval run directory with answers scored (no {', '.join(missing)}); "
                           "give RUN, RUN:tuned or RUN:base of `dpo-eval evaluate`")
    return side


def _features(side: Side) -> pl.DataFrame:
    return pl.read_parquet(side.run / "features.parquet")


def comparison_features(a: Side, b: Side) -> tuple[pl.DataFrame, dict]:
    """features.parquet's shape for B vs A (A as base, B as tuned, labels from A) and what was matched."""
    fa, fb = _features(a), _features(b)
    names = [c for c in fa.columns if c in fb.columns and c not in ("pair_id", "split", "role")
             and fa.schema[c].is_numeric() and fb.schema[c].is_numeric()]
    left_out = sorted((set(fa.columns) ^ set(fb.columns)) - {"truncated"})
    ids_a = set(pl.read_parquet(a.run / "pairs.parquet")["pair_id"].to_list())
    ids_b = set(pl.read_parquet(b.run / "pairs.parquet")["pair_id"].to_list())
    side_a = fa.filter(pl.col("role") == a.role)
    side_b = fb.filter(pl.col("role") == b.role)
    answered = set(side_a["pair_id"].to_list()) & set(side_b["pair_id"].to_list())
    matched = ids_a & ids_b & answered
    report = {"a": a.label, "b": b.label, "matched": len(matched), "pairs_a": len(ids_a), "pairs_b": len(ids_b),
              "only_in_a": len(ids_a - ids_b), "only_in_b": len(ids_b - ids_a),
              "not_answered_by_both": len((ids_a & ids_b) - answered), "features": len(names),
              "features_left_out": left_out}
    if not matched:
        raise DpoEvalError(f"{a.label} and {b.label} share no answered pair (pairs: {len(ids_a)} and {len(ids_b)}, "
                           f"{len(ids_a & ids_b)} in both): compare runs evaluated on the same data set")
    keep = pl.col("pair_id").is_in(sorted(matched))
    split = fa.select("pair_id", "split").unique(subset="pair_id", keep="first")
    parts = [fa.filter(keep & pl.col("role").is_in(["chosen", "rejected"])).select("pair_id", "split", "role", *names),
             side_a.filter(keep).select("pair_id", "split", pl.lit("base").alias("role"), *names),
             side_b.filter(keep).drop("split").join(split, on="pair_id", how="left")
             .select("pair_id", "split", pl.lit("tuned").alias("role"), *names)]
    return pl.concat(parts, how="vertical_relaxed"), report


def compare_runs(a: str | Path, b: str | Path, out: Path, spec: AnalysisSpec | None = None) -> dict:
    """The paired analysis of B - A beside A's chosen - rejected, written to `out` (features.parquet, stats.*,
    summary.json with a `compare` block, report.html); returns the summary."""
    from dpo_eval.analysis import run_analysis
    from dpo_eval.pipeline import run_analysis_spec
    from dpo_eval.report import Section, write_outputs

    side_a, side_b = parse_side(str(a)), parse_side(str(b))
    spec = spec or run_analysis_spec(side_a.run)
    features, report = comparison_features(side_a, side_b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features.write_parquet(out / "features.parquet")
    analysis = run_analysis(features, spec)
    report["note"] = (f"In every table and sentence of this report, 'base' is A ({side_a.label}) and 'tuned' is B "
                      f"({side_b.label}); chosen, rejected, the splits and S_j are A's.")
    section = Section("compare", "Comparison of two systems", [
        report["note"],
        f"{report['matched']} pairs matched by pair_id: {report['pairs_a']} in A, {report['pairs_b']} in B; "
        f"{report['only_in_a']} only in A and {report['only_in_b']} only in B (another data set or --limit), "
        f"{report['not_answered_by_both']} in both but not answered by both sides; {report['features']} features "
        "compared" + (f" (left out, in one run only: {', '.join(report['features_left_out'])})"
                      if report["features_left_out"] else "") + "."])
    return write_outputs(analysis.stats, analysis.summary | {"compare": report}, out, [section])

