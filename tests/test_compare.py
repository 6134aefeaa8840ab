"""A/B comparison of two runs (issue 17's compare): known answers from the runs' own tables."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import polars.testing
import pytest

from dpo_eval.compare import compare_runs
from dpo_eval.config import AnalysisSpec, DatasetSpec, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from tests.builders import make_adapter

SPEC = AnalysisSpec(bootstrap=100, permutations=100)


def build_run(out, stories, adapter, orca, limit, cache, reference=None):
    """A run directory through the core stages (no Prefect): pairs, answers, features, stats, summary;
    `reference`: the reference adapter that makes the run's 'base' side."""
    from dpo_eval import pipeline
    from dpo_eval.analysis import run_analysis
    from dpo_eval.data import read_pairs
    from dpo_eval.generation import generate_both
    from dpo_eval.models import load_model
    from dpo_eval.report import write_outputs

    pairs = read_pairs(DatasetSpec(source=str(orca), limit=limit))[0]
    loaded = load_model(ModelSpec(base=str(stories), adapter=str(adapter), quantization="4bit",
                                  reference_adapter=str(reference) if reference else None))
    answers = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=10, batch_size=8))
    pipeline.release_models()
    texts = pipeline.texts_of(pairs, answers)
    scores, _ = pipeline.score_frame(texts, ScoringSpec(cache_dir=cache, n_process=1))
    features = pipeline.features_table(texts, scores)
    out.mkdir(parents=True)
    pairs.write_parquet(out / "pairs.parquet")
    answers.write_parquet(out / "answers.parquet")
    features.write_parquet(out / "features.parquet")
    (out / "config.json").write_text(json.dumps({"config": {"analysis": SPEC.model_dump(mode="json")}}))
    analysis = run_analysis(features, SPEC)
    write_outputs(analysis.stats, analysis.summary, out)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stories260k, orca_jsonl):
    root = tmp_path_factory.mktemp("compare")
    a = make_adapter(stories260k, root / "adapter-a", zero=False, seed=5)
    b = make_adapter(stories260k, root / "adapter-b", zero=False, seed=6)
    return {"a": build_run(root / "run-a", stories260k, a, orca_jsonl, 16, root / "scores"),
            "b": build_run(root / "run-b", stories260k, b, orca_jsonl, 12, root / "scores")}


def tb(stats: pl.DataFrame) -> pl.DataFrame:
    return stats.filter(pl.col("comparison") == "tuned_vs_base").sort("split", "feature")


def test_base_against_tuned_reproduces_the_run_itself(runs, tmp_path):
    summary = compare_runs(f"{runs['a']}:base", runs["a"], tmp_path / "cmp")
    assert summary["compare"]["matched"] == 16 and summary["compare"]["only_in_a"] == 0
    polars.testing.assert_frame_equal(tb(pl.read_parquet(tmp_path / "cmp" / "stats.parquet")),
                                      tb(pl.read_parquet(runs["a"] / "stats.parquet")))
    assert "'base' is A" in (tmp_path / "cmp" / "report.html").read_text().replace("&#39;", "'")


def test_a_run_against_itself_moves_nothing(runs, tmp_path):
    summary = compare_runs(runs["a"], f"{runs['a']}:tuned", tmp_path / "self")
    rows = tb(pl.read_parquet(tmp_path / "self" / "stats.parquet"))
    assert (rows["mean_delta"].fill_nan(0.0) == 0).all() and rows["p_value"].is_nan().all()
    assert all(v == 0 for v in summary["significant"]["tuned_vs_base"].values())


def test_two_adapters_on_the_pairs_both_answered(runs, tmp_path):
    summary = compare_runs(runs["a"], runs["b"], tmp_path / "ab")
    report = summary["compare"]
    assert (report["matched"], report["pairs_a"], report["pairs_b"], report["only_in_a"]) == (12, 16, 12, 4)
    fa, fb = (pl.read_parquet(runs[k] / "features.parquet").filter(pl.col("role") == "tuned") for k in "ab")
    joined = fa.join(fb, on="pair_id", suffix="_b")
    splits = pl.read_parquet(runs["a"] / "pairs.parquet").select("pair_id", "split")
    joined = joined.drop("split").join(splits, on="pair_id")
    rows = tb(pl.read_parquet(tmp_path / "ab" / "stats.parquet"))
    for row in rows.filter(pl.col("feature").is_in(["n_tokens", "flesch_reading_ease"])).iter_rows(named=True):
        part = joined.filter(pl.col("split") == row["split"])
        d = (part[f"{row['feature']}_b"] - part[row["feature"]]).to_numpy()
        d = d[np.isfinite(d)]
        assert row["n"] == d.size
        assert np.isnan(row["mean_delta"]) if d.size == 0 else row["mean_delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert rows.filter(pl.col("split") == "train")["n"].max() > 0


def test_b_against_a_equals_b_evaluated_with_a_as_its_reference(runs, stories260k, orca_jsonl, tmp_path):
    """compare(A, B) on the same pairs is the evaluation of adapter B whose 'base' side is base + adapter A."""
    root = runs["a"].parent
    a12 = build_run(tmp_path / "run-a12", stories260k, root / "adapter-a", orca_jsonl, 12, root / "scores")
    b_ref_a = build_run(tmp_path / "run-b-ref-a", stories260k, root / "adapter-b", orca_jsonl, 12, root / "scores",
                        reference=root / "adapter-a")
    compare_runs(a12, runs["b"], tmp_path / "ab")
    compared, evaluated = (tb(pl.read_parquet(folder / "stats.parquet")) for folder in (tmp_path / "ab", b_ref_a))
    assert compared.height == evaluated.height > 0
    numbers = ["n", "mean_delta", "norm_mean_delta", "scale", "ci_low", "ci_high", "p_value", "q_value",
               "effect_size", "sign_agreement"]
    polars.testing.assert_frame_equal(compared.select("split", "feature", *numbers),
                                      evaluated.select("split", "feature", *numbers))


def test_a_folder_that_is_not_a_run_is_named(runs, tmp_path):
    with pytest.raises(DpoEvalError, match=f"{tmp_path}: not a dpo-eval run directory"):
        compare_runs(tmp_path, runs["a"], tmp_path / "out")
