"""A/B comparison of two runs (issue 17's compare): known answers from the runs' own tables."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import polars.testing
import pytest

from dpo_eval.config import AnalysisSpec, DatasetSpec, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.studies.compare import compare_runs
from tests.builders import make_adapter

SPEC = AnalysisSpec(bootstrap=100, permutations=100)


def build_run(out, stories, adapter, orca, limit, cache, reference=None):
    """A run directory through the core stages (no Prefect): pairs, answers, features, stats, summary;
    `reference`: the reference adapter that makes the run's 'base' side."""
    from dpo_eval import stages
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model
    from dpo_eval.report.page import write_outputs
    from dpo_eval.stats.analysis import run_analysis

    pairs = read_pairs(DatasetSpec(source=str(orca), limit=limit))[0]
    loaded = load_model(ModelSpec(base=str(stories), adapter=str(adapter), quantization="4bit",
                                  reference_adapter=str(reference) if reference else None))
    answers = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=10, batch_size=8))
    stages.release_models()
    texts = stages.texts_of(pairs, answers)
    scores, _ = stages.score_frame(texts, ScoringSpec(cache_dir=cache, n_process=1))
    features = stages.features_table(texts, scores)
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
    # A's prompts travel with the pairs, so a prompt with several pairs counts once in B vs A as in the run itself
    prompts = pl.read_parquet(tmp_path / "cmp" / "features.parquet").select("pair_id", "prompt_id").unique()
    assert prompts.sort("pair_id").equals(
        pl.read_parquet(runs["a"] / "features.parquet").select("pair_id", "prompt_id").unique().sort("pair_id"))


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
    with pytest.raises(DpoEvalError, match="would overwrite that run's tables"):
        compare_runs(runs["a"], runs["b"], runs["b"])


def test_out_onto_a_third_runs_folder_is_refused_and_an_earlier_comparison_reused(runs, tmp_path):
    import shutil

    third = tmp_path / "third"
    shutil.copytree(runs["b"], third)  # an evaluation, neither A nor B
    before = {p.name: p.read_bytes() for p in third.iterdir() if p.is_file()}
    with pytest.raises(DpoEvalError, match=f"--out {third} holds an evaluation run, not an earlier comparison"):
        compare_runs(runs["a"], runs["b"], third)
    assert {p.name: p.read_bytes() for p in third.iterdir() if p.is_file()} == before  # untouched
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(DpoEvalError, match="holds other files"):
        compare_runs(runs["a"], runs["b"], tmp_path / "notes")
    with pytest.raises(DpoEvalError, match="is a file"):
        compare_runs(runs["a"], runs["b"], tmp_path / "notes" / "todo.txt")
    compare_runs(runs["a"], runs["b"], tmp_path / "cmp")
    summary = compare_runs(runs["a"], runs["b"], tmp_path / "cmp")  # an earlier comparison: reused
    assert summary["compare"]["matched"] > 0


def test_a_pair_b_was_trained_on_is_not_held_out_in_the_comparison(runs, tmp_path):
    import shutil

    a, b = tmp_path / "run-a", tmp_path / "run-b"
    shutil.copytree(runs["a"], a)
    shutil.copytree(runs["b"], b)
    shared = sorted(set(pl.read_parquet(a / "features.parquet")["pair_id"]) & set(pl.read_parquet(b / "features.parquet")["pair_id"]))
    moved = set(shared[:2])  # A holds these out, B's run says it was trained on them

    def set_split(run, split):
        features = pl.read_parquet(run / "features.parquet")
        features.with_columns(split=pl.when(pl.col("pair_id").is_in(sorted(moved))).then(pl.lit(split))
                              .otherwise(pl.col("split"))).write_parquet(run / "features.parquet")

    set_split(a, "valid")
    set_split(b, "valid")
    plain = compare_runs(a, b, tmp_path / "plain")["compare"]  # held out by both: compared
    set_split(b, "train")
    assert compare_runs(a, b, tmp_path / "unknown")["compare"]["held_out_by_a_trained_by_b"] == 0  # B's split is
    summary_b = json.loads((b / "summary.json").read_text())  # not known to be its training split: nothing dropped
    (b / "summary.json").write_text(json.dumps(summary_b | {"split_source": "checkpoint training metadata"}))
    summary = compare_runs(a, b, tmp_path / "cmp")
    assert plain["held_out_by_a_trained_by_b"] == 0
    assert summary["compare"]["held_out_by_a_trained_by_b"] == len(moved)
    assert summary["compare"]["matched"] == plain["matched"] - len(moved)
    kept = set(pl.read_parquet(tmp_path / "cmp" / "features.parquet")["pair_id"])
    assert not kept & moved and "B was trained on are left out" in (tmp_path / "cmp" / "report.html").read_text()


def test_a_comparison_can_be_judged_b_against_a(runs, stories260k, tmp_path):
    """compare writes A's side as 'base' and B's as 'tuned' answers of the matched pairs: the judge (a real
    local HF judge on stories260k) judges B against A there."""
    from dpo_eval.config import JudgeSpec
    from dpo_eval.judges.pairwise import judge_run
    from dpo_eval.report.judge import write_judge_report

    out = tmp_path / "ab"
    summary = compare_runs(runs["a"], f"{runs['b']}:base", out)
    assert summary["compare"]["judgeable"] and summary["compare"]["matched"] == 12
    answers = pl.read_parquet(out / "answers.parquet")
    assert answers.height == 24 and set(answers["pair_id"]) == set(pl.read_parquet(out / "pairs.parquet")["pair_id"])
    for role, run, side in (("base", runs["a"], "tuned"), ("tuned", runs["b"], "base")):
        mine = answers.filter(pl.col("model") == role).sort("pair_id")["answer"]
        source = pl.read_parquet(run / "answers.parquet").filter(
            (pl.col("model") == side) & pl.col("pair_id").is_in(answers["pair_id"].to_list())).sort("pair_id")
        assert mine.to_list() == source["answer"].to_list()
    block = judge_run(out, JudgeSpec(kind="hf", model=str(stories260k), compute_dtype="float32", context_tokens=384,
                                     comparisons=("tuned_vs_base",), cache_dir=tmp_path / "judge-cache"))
    judged = sum(split["tuned_vs_base"]["n"] for split in block["splits"].values() if split.get("tuned_vs_base"))
    assert judged == 12
    table = pl.read_parquet(out / "judgments.parquet")
    assert table.height == 24 and set(table["order"]) == {"ab", "ba"}
    headline = write_judge_report(out)["judge_headline"]
    assert headline[0].startswith("In this comparison 'tuned' is B") and f"{runs['b']}:base" in headline[0]


def test_a_base_side_is_named_with_its_reference_adapter(runs, tmp_path):
    import shutil

    run = shutil.copytree(runs["a"], tmp_path / "run-with-reference")
    summary = json.loads((run / "summary.json").read_text())
    summary["reference"] = {"adapter": "/ckpt/sft", "label": "base + reference adapter /ckpt/sft"}
    (run / "summary.json").write_text(json.dumps(summary))
    note = compare_runs(f"{run}:base", runs["b"], tmp_path / "cmp")["compare"]["note"]
    assert f"'base' is A ({run}:base (base + reference adapter /ckpt/sft))" in note
    assert f"'tuned' is B ({runs['b']}:tuned)" in note
