"""Questions without labels (the prompts format): tuned vs base alone, or with a reference data set's
chosen - rejected as the direction and the scale."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import polars.testing
import pytest
from scipy import stats as sps

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, JudgeSpec, ModelSpec, ScoringSpec
from dpo_eval.data.pairs import is_labeled, read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.stats.analysis import run_analysis
from tests.builders import make_adapter


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_questions_without_labels_are_read_as_the_valid_split(tmp_path):
    source = write_jsonl(tmp_path / "q.jsonl", [
        {"question": "What is a cat?", "system": "Be brief."},
        {"prompt": [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi there"}]},
        {"prompt": "Name a colour.", "split": "train"},
        {"prompt": "   "},
        {"question": "What is a cat?", "system": "Be brief."},
    ])
    pairs, report = read_pairs(DatasetSpec(source=str(source)))
    assert report.format == "prompts" and not is_labeled(pairs)
    assert report.left_out == {"empty prompt": 1} and report.duplicates == 1
    assert pairs["split"].to_list() == ["valid", "valid", "train"]  # held out unless a record names its split
    assert pairs["system"].to_list() == ["Be brief.", "Sys.", ""]
    assert pairs["prompt"].to_list() == ["What is a cat?", "Hi there", "Name a colour."]
    assert pairs["chosen"].null_count() == 3 and pairs["rejected"].null_count() == 3
    again, _ = read_pairs(DatasetSpec(source=str(source)))
    assert again["pair_id"].to_list() == pairs["pair_id"].to_list()


def long_features(values: dict[str, np.ndarray], splits: list[str], prefix: str) -> pl.DataFrame:
    """features.parquet's shape from {role: (n x 2) values} for features f0, f1."""
    frames = []
    for role, matrix in values.items():
        frames.append(pl.DataFrame({"pair_id": [f"{prefix}{i}" for i in range(len(splits))], "split": splits,
                                    "role": [role] * len(splits), "f0": matrix[:, 0], "f1": matrix[:, 1]}))
    return pl.concat(frames)


@pytest.fixture
def planted():
    rng = np.random.default_rng(7)
    n, m = 40, 30
    base = rng.normal(size=(n, 2))
    tuned = base + np.array([0.8, -0.6]) + rng.normal(scale=0.5, size=(n, 2))
    rejected = rng.normal(size=(m, 2))
    chosen = rejected + np.array([1.0, 0.7]) + rng.normal(scale=0.8, size=(m, 2))
    ref_splits = ["train"] * 24 + ["valid"] * 6
    features = long_features({"base": base, "tuned": tuned}, ["valid"] * n, "q")
    reference = long_features({"chosen": chosen, "rejected": rejected}, ref_splits, "r")
    return {"features": features, "reference": reference, "tb": tuned - base,
            "cr_train": (chosen - rejected)[:24]}


def test_without_a_reference_tuned_vs_base_is_tested_and_nothing_is_normalised(planted):
    analysis = run_analysis(planted["features"], AnalysisSpec(bootstrap=50, permutations=50))
    tb = analysis.stats.filter((pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "valid")).sort("feature")
    for j, row in enumerate(tb.iter_rows(named=True)):
        assert row["n"] == 40
        assert row["p_value"] == pytest.approx(sps.wilcoxon(planted["tb"][:, j]).pvalue, rel=1e-12)
        assert row["mean_delta"] == pytest.approx(planted["tb"][:, j].mean(), rel=1e-12)
        assert np.isnan(row["norm_mean_delta"]) and np.isnan(row["sign_agreement"])
    cr = analysis.stats.filter(pl.col("comparison") == "chosen_vs_rejected")
    assert (cr["n"] == 0).all() and cr["reason"].str.contains("--reference-dataset").all()
    assert analysis.summary["labels"]["source"] == "none"
    assert np.isnan(analysis.summary["sign_agreement"]["valid"])


def test_a_reference_gives_the_direction_and_the_scale_from_its_train_split(planted):
    analysis = run_analysis(planted["features"], AnalysisSpec(bootstrap=50, permutations=200),
                            reference=planted["reference"])
    stats = analysis.stats.filter(pl.col("split") == "valid").sort("feature")
    scale = planted["cr_train"].std(axis=0, ddof=1)
    direction = np.sign(planted["cr_train"].mean(axis=0))
    tb = stats.filter(pl.col("comparison") == "tuned_vs_base")
    for j, row in enumerate(tb.iter_rows(named=True)):
        assert row["scale"] == pytest.approx(scale[j], rel=1e-12)
        assert row["norm_mean_delta"] == pytest.approx(planted["tb"][:, j].mean() / scale[j], rel=1e-12)
        assert row["sign_agreement"] == direction[j] * np.sign(planted["tb"][:, j].mean())
    assert tb["sign_agreement"].to_list() == [1.0, -1.0]  # planted: f0 moves toward chosen, f1 away
    cr = stats.filter(pl.col("comparison") == "chosen_vs_rejected")
    for j, row in enumerate(cr.iter_rows(named=True)):
        assert row["n"] == 24 and row["p_value"] == pytest.approx(sps.wilcoxon(planted["cr_train"][:, j]).pvalue)
    assert analysis.summary["labels"] == {"source": "reference", "reference_split": "train", "reference_pairs": 24,
                                          "note": analysis.summary["labels"]["note"]}
    assert analysis.summary["sign_agreement"]["valid"] == 0.5
    assert analysis.summary["scale_source"].startswith("the reference data set: train")


def test_a_reference_is_refused_for_labelled_data_and_must_have_labels(planted):
    with pytest.raises(DpoEvalError, match="reference data set is for questions without labels"):
        run_analysis(planted["reference"], reference=planted["reference"])
    with pytest.raises(DpoEvalError, match="no chosen or rejected rows"):
        run_analysis(planted["features"], reference=planted["features"])


@pytest.fixture(scope="module")
def questions(tmp_path_factory, orca_jsonl):
    root = tmp_path_factory.mktemp("questions")
    records = [json.loads(line) for line in orca_jsonl.read_text().splitlines()[:10]]
    return write_jsonl(root / "questions.jsonl", [{"question": r["question"], "system": r["system"]} for r in records])


def unlabeled_config(questions, stories, adapter, out, cache, reference=None, **extra) -> EvalConfig:
    return EvalConfig(dataset=DatasetSpec(source=str(questions)),
                      reference_dataset=DatasetSpec(source=str(reference), limit=30) if reference else None,
                      model=ModelSpec(base=str(stories), adapter=str(adapter), quantization="4bit"),
                      generation=GenerationSpec(max_new_tokens=10, batch_size=8),
                      scoring=ScoringSpec(cache_dir=cache, n_process=1), analysis=AnalysisSpec(bootstrap=100),
                      out=out, shard_size=8, **extra)


def test_the_flow_runs_questions_alone_and_with_a_reference(harness, tmp_path, questions, stories260k, orca_jsonl):
    """Questions only: generation, features, tuned-vs-base statistics and the judge's win rate, no implicit
    rewards and no calibration, the report saying why; with the reference, sign agreement and the reward
    model's calibration on the reference's labels."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    from dpo_eval.report.judge import judge_headline
    from dpo_eval.studies.reward_scores import reward_judge_run
    from dpo_eval.training.reward import train_reward_model

    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=3)
    alone = evaluate_checkpoint(unlabeled_config(
        questions, stories260k, adapter, tmp_path / "alone", tmp_path / "cache",
        judge=JudgeSpec(kind="hf", model=str(stories260k), max_tokens=1)))
    assert alone["labels"]["source"] == "none" and alone["n_pairs"]["valid"] == 10
    assert "implicit_reward" not in alone and "no direction to move toward" in alone["sentences"][1]
    assert alone["judge"]["splits"]["valid"]["tuned_vs_base"]["n"] == 10
    assert "chosen_vs_rejected" not in alone["judge"]["splits"]["valid"]
    judgments = pl.read_parquet(tmp_path / "alone" / "judgments.parquet")
    assert set(judgments["comparison"]) == {"tuned_vs_base"} and judgments.height == 20  # both orders
    features = pl.read_parquet(tmp_path / "alone" / "features.parquet")
    assert set(features["role"]) == {"base", "tuned"}
    report = (tmp_path / "alone" / "report.html").read_text()
    assert "holds questions without chosen or rejected answers" in report
    assert "these questions have no chosen or rejected answers to check it on" in report  # the judge's trust

    with_ref = evaluate_checkpoint(unlabeled_config(questions, stories260k, adapter, tmp_path / "ref",
                                                    tmp_path / "cache", reference=orca_jsonl))
    assert with_ref["labels"]["source"] == "reference" and with_ref["labels"]["reference_pairs"] > 0
    assert np.isfinite(with_ref["sign_agreement"]["valid"])
    assert with_ref["cache"]["score"]["misses"] == 0  # the answers were scored by the first run
    reference = pl.read_parquet(tmp_path / "ref" / "reference_features.parquet")
    assert set(reference["role"]) == {"chosen", "rejected"}
    stats = pl.read_parquet(tmp_path / "ref" / "stats.parquet")
    tb = stats.filter((pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "valid"))
    assert tb["norm_mean_delta"].is_finite().sum() > 0
    pl.testing.assert_series_equal(tb.sort("feature")["p_value"],  # the reference changes no tuned-vs-base test
                                   pl.read_parquet(tmp_path / "alone" / "stats.parquet").filter(
                                       (pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "valid")
                                   ).sort("feature")["p_value"])

    model = tmp_path / "reward"
    train_reward_model(stories260k, orca_jsonl, model, steps=2, batch_size=4, max_length=96)
    block = reward_judge_run(tmp_path / "ref", model)
    assert block["reference_splits"]["train"]["n"] == with_ref["labels"]["reference_pairs"]
    assert block["splits"]["valid"]["win_n"] == 10 and block["splits"]["valid"]["n"] == 0
    row = pl.read_parquet(tmp_path / "ref" / "stats.parquet").filter(
        (pl.col("feature") == "reward_model") & (pl.col("comparison") == "tuned_vs_base") & (pl.col("split") == "valid"))
    assert row["scale"].is_finite().all()  # S_j of the reward feature from the reference's scored labels
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["labels"]["source"] == "reference"  # the judge's re-analysis kept the reference
    assert "On the reference data set's valid split this reward model" in judge_headline(summary)[0]
    assert "reference valid" in (tmp_path / "ref" / "report.html").read_text()  # its calibration rows


def test_evaluate_refuses_a_reference_beside_labelled_data_before_any_model(tmp_path, stories260k, orca_jsonl):
    from dpo_eval.preflight import check_evaluation

    adapter = make_adapter(stories260k, tmp_path / "adapter")
    config = unlabeled_config(orca_jsonl, stories260k, adapter, tmp_path / "run", tmp_path / "cache",
                              reference=orca_jsonl)
    with pytest.raises(DpoEvalError, match="--reference-dataset .*has chosen and rejected answers"):
        check_evaluation(config)
