"""A/B comparison of two evaluated systems on the same prompts: does B write differently from A, and in
the direction of chosen over rejected?

A side is a run directory's tuned answers (`RUN` or `RUN:tuned`) or its base answers (`RUN:base`). The
pairs both sides answered are matched by pair_id; the comparison's features table puts A's side in the
role `base` and B's side in the role `tuned`, with chosen and rejected (and the split) from run A, so the
whole paired analysis applies unchanged: d = B - A beside d_cr = chosen - rejected, S_j the std of A's
train d_cr. Comparing RUN:base with RUN reproduces that run's own tuned-vs-base statistics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from dpo_eval.config import AnalysisSpec
from dpo_eval.data.prompt_sets import first_turn
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

    @property
    def system(self) -> str:
        """The label with what the side is, from the run's summary: a base side names its reference adapter."""
        if self.role != "base":
            return self.label
        try:
            reference = json.loads((self.run / "summary.json").read_text()).get("reference") or {}
        except (OSError, ValueError):
            reference = {}
        described = reference.get("label")
        return f"{self.label} ({described})" if described else self.label


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


def _split_from_training(run: Path) -> bool:
    """Whether a run's train/valid split is its checkpoint's recorded training split (summary.json's
    split_source; a run written before that field is taken as not)."""
    try:
        source = json.loads((run / "summary.json").read_text()).get("split_source") or ""
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(source, str) and source.startswith("checkpoint training metadata")


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
    # A pair is held out in the comparison only where it is held out in both runs: one that A holds out (valid)
    # but B was trained on (train) is dropped, so the comparison's valid split is held out for both systems.
    # B's train split says what B was trained on only where it came from its checkpoint's training metadata, and
    # only for B's tuned side (a base side was trained on nothing here).
    valid_a = set(fa.filter(pl.col("split") == "valid")["pair_id"].to_list())
    train_b = set(fb.filter(pl.col("split") == "train")["pair_id"].to_list()) if b.role == "tuned" and \
        _split_from_training(b.run) else set()
    trained_by_b = valid_a & train_b & ids_a & ids_b & answered
    matched = (ids_a & ids_b & answered) - trained_by_b
    report = {"a": a.label, "b": b.label, "matched": len(matched), "pairs_a": len(ids_a), "pairs_b": len(ids_b),
              "only_in_a": len(ids_a - ids_b), "only_in_b": len(ids_b - ids_a),
              "not_answered_by_both": len((ids_a & ids_b) - answered), "held_out_by_a_trained_by_b": len(trained_by_b),
              "features": len(names), "features_left_out": left_out}
    if not matched:
        raise DpoEvalError(f"{a.label} and {b.label} share no answered pair (pairs: {len(ids_a)} and {len(ids_b)}, "
                           f"{len(ids_a & ids_b)} in both): compare runs evaluated on the same data set")
    keep = pl.col("pair_id").is_in(sorted(matched))
    prompt = ["prompt_id"] if "prompt_id" in fa.columns else []  # A's prompts: each counted once in B vs A
    split = fa.select("pair_id", "split", *prompt).unique(subset="pair_id", keep="first")
    parts = [fa.filter(keep & pl.col("role").is_in(["chosen", "rejected"])).select(
                 "pair_id", "split", *prompt, "role", *names),
             side_a.filter(keep).select("pair_id", "split", *prompt, pl.lit("base").alias("role"), *names),
             side_b.filter(keep).drop("split", *[c for c in prompt if c in fb.columns]).join(split, on="pair_id",
                                                                                               how="left")
             .select("pair_id", "split", *prompt, pl.lit("tuned").alias("role"), *names)]
    return pl.concat(parts, how="vertical_relaxed"), report


def comparison_answers(a: Side, b: Side, matched: set[str]) -> tuple[pl.DataFrame, pl.DataFrame] | None:
    """pairs.parquet and answers.parquet for the comparison folder (A's side as `base`, B's as `tuned`, the
    matched pairs, A's pairs and splits), so `dpo-eval judge OUT` judges B against A; None where a run has no
    answers.parquet (a run scored from texts only)."""
    if not ((a.run / "answers.parquet").is_file() and (b.run / "answers.parquet").is_file()):
        return None
    keep = pl.col("pair_id").is_in(sorted(matched))
    pairs = pl.read_parquet(a.run / "pairs.parquet").filter(keep)
    side_a = first_turn(pl.read_parquet(a.run / "answers.parquet")).filter(keep & (pl.col("model") == a.role))
    side_b = first_turn(pl.read_parquet(b.run / "answers.parquet")).filter(keep & (pl.col("model") == b.role))
    answers = pl.concat([side_a.with_columns(model=pl.lit("base")), side_b.with_columns(model=pl.lit("tuned"))],
                        how="diagonal_relaxed")
    return pairs, answers


def refuse_occupied(out: Path) -> None:
    """`out` must be new, empty, or an earlier comparison (its summary.json has a `compare` block): writing a
    comparison over an evaluation's folder would replace its features, pairs and answers and delete its judgments."""
    if out.exists() and not out.is_dir():
        raise DpoEvalError(f"--out {out} is a file: give a folder for the comparison")
    if not out.is_dir() or not any(out.iterdir()):
        return
    summary = out / "summary.json"
    try:
        found = json.loads(summary.read_text())
        earlier = isinstance(found, dict) and "compare" in found
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        what = "an evaluation run" if (out / "answers.parquet").is_file() or summary.is_file() else "other files"
        raise DpoEvalError(f"--out {out} holds {what}, not an earlier comparison: the comparison would overwrite it; "
                           "give a new or empty folder")


def compare_runs(a: str | Path, b: str | Path, out: Path, spec: AnalysisSpec | None = None) -> dict:
    """The paired analysis of B - A beside A's chosen - rejected, written to `out` (features.parquet, stats.*,
    summary.json with a `compare` block, report.html; with both runs' answers, pairs.parquet and answers.parquet
    too, so `dpo-eval judge OUT` judges B against A); returns the summary."""
    from dpo_eval.report.page import Section, write_outputs
    from dpo_eval.stages import run_analysis_spec
    from dpo_eval.stats.analysis import run_analysis

    side_a, side_b = parse_side(str(a)), parse_side(str(b))
    spec = spec or run_analysis_spec(side_a.run)
    out = Path(out)
    for side in (side_a, side_b):
        if out.resolve() == side.run.resolve():
            raise DpoEvalError(f"--out {out} is run {side.label} itself: the comparison would overwrite that run's "
                               "tables; give another folder")
    refuse_occupied(out)
    features, report = comparison_features(side_a, side_b)
    out.mkdir(parents=True, exist_ok=True)
    features.write_parquet(out / "features.parquet")
    for stale in ("pairs.parquet", "answers.parquet", "judgments.parquet"):  # an earlier comparison's, in a reused --out
        (out / stale).unlink(missing_ok=True)
    judgeable = comparison_answers(side_a, side_b, set(features["pair_id"].to_list()))
    if judgeable is not None:
        judgeable[0].write_parquet(out / "pairs.parquet")
        judgeable[1].write_parquet(out / "answers.parquet")
    report["judgeable"] = judgeable is not None
    report["a_system"], report["b_system"] = side_a.system, side_b.system
    analysis = run_analysis(features, spec)
    report["note"] = (f"In every table and sentence of this report, 'base' is A ({report['a_system']}) and 'tuned' is "
                      f"B ({report['b_system']}); chosen, rejected, the splits and S_j are A's.")
    section = Section("compare", "Comparison of two systems", [
        report["note"],
        f"{report['matched']} pairs matched by pair_id: {report['pairs_a']} in A, {report['pairs_b']} in B; "
        f"{report['only_in_a']} only in A and {report['only_in_b']} only in B (another data set or --limit), "
        f"{report['not_answered_by_both']} in both but not answered by both sides; {report['features']} features "
        "compared" + (f" (left out, in one run only: {', '.join(report['features_left_out'])})"
                      if report["features_left_out"] else "") + ".",
        f"{report['held_out_by_a_trained_by_b']} pairs that A holds out (valid) but B was trained on are left out: "
        "a pair counts as held out only where it is held out in both runs, and the splits are A's otherwise.",
        f"`dpo-eval judge {out}` judges B against A on these pairs (its 'tuned vs base' is B vs A)."
        if judgeable is not None else "A run without answers.parquet: this comparison cannot be judged."])
    return write_outputs(analysis.stats, analysis.summary | {"compare": report}, out, [section])

