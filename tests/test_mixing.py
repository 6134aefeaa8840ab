"""Mixed training data (issue 17): sources, weighted draws, the checkpoint's record of them, and evaluation
per source. Real trl training on stories260k, the real evaluation flow."""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.data.mixing import mix_train, read_sources
from dpo_eval.errors import DpoEvalError


@pytest.fixture(scope="module")
def two_sources(orca_jsonl, hh_rlhf_gz):
    return (DatasetSpec(source=str(orca_jsonl), limit=40), DatasetSpec(source=str(hh_rlhf_gz), limit=24))


def test_weights_give_exact_shares_drawn_without_replacement(two_sources):
    pairs, reports = read_sources(two_sources)
    assert pairs["pair_id"].is_unique().all() and [r["total"] for r in reports] == [40, 24]
    available = {s: pairs.filter((pl.col("source") == s) & (pl.col("split") == "train")).height
                 for s in pairs["source"].unique()}
    orca, hh = (spec.source for spec in two_sources)
    train, mix = mix_train(pairs, (3, 1), seed=7)
    # N = min(available_i / w_i): the scarcest source relative to its share sets the size of the mix
    total = min(available[orca] / 0.75, available[hh] / 0.25)
    assert mix[orca]["used"] == int(0.75 * total) and mix[hh]["used"] == int(0.25 * total)
    counts = dict(train.group_by("source").len().iter_rows())
    assert counts == {orca: mix[orca]["used"], hh: mix[hh]["used"]}
    assert abs(counts[orca] / counts[hh] - 3) < 3 / counts[hh] + 1e-9  # exact up to the floor
    assert train["pair_id"].is_unique().all() and (train["split"] == "train").all()
    again, _ = mix_train(pairs, (3, 1), seed=7)
    other, _ = mix_train(pairs, (3, 1), seed=8)
    assert again["pair_id"].to_list() == train["pair_id"].to_list()
    assert other["pair_id"].to_list() != train["pair_id"].to_list()
    unweighted, _ = mix_train(pairs, None, seed=7)
    assert unweighted.height == sum(available.values())


def test_a_pair_in_two_sources_is_kept_once_and_bad_mixes_are_named(two_sources, tmp_path):
    copy = tmp_path / "orca-copy.jsonl"
    shutil.copy(two_sources[0].source, copy)
    pairs, reports = read_sources((two_sources[0], DatasetSpec(source=str(copy), limit=50)))
    assert pairs.height == reports[0]["total"] + reports[1]["total"] and reports[1]["in_earlier_source"] == 40
    with pytest.raises(DpoEvalError, match="no pairs left"):
        read_sources((two_sources[0], DatasetSpec(source=str(copy), limit=40)))
    with pytest.raises(DpoEvalError, match="given twice"):
        read_sources((two_sources[0], two_sources[0]))
    with pytest.raises(DpoEvalError, match="--weights: 2 positive numbers"):
        mix_train(read_sources(two_sources)[0], (1.0,), seed=0)


def test_train_cli_names_a_weights_mismatch(two_sources, stories260k, tmp_path, capsys):
    from dpo_eval.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--base", str(stories260k), "--dataset", two_sources[0].source, "--dataset",
              two_sources[1].source, "--weights", "0.2,0.3,0.5", "--out", str(tmp_path / "t")])
    assert exit_.value.code == 2 and "--weights: 2 positive numbers" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory, stories260k, two_sources):
    from dpo_eval.training.dpo import TrainSpec, train_dpo

    root = tmp_path_factory.mktemp("mixed")
    spec = TrainSpec(base=str(stories260k), dataset=two_sources[0], extra_datasets=two_sources[1:], out=root / "ckpt",
                     steps=2, save_every=2, batch_size=4, max_length=96, weights=(0.5, 0.5), quantization="none")
    return train_dpo(spec)[-1]


def test_checkpoint_metadata_records_each_pairs_source(mixed_checkpoint, two_sources):
    meta = json.loads((mixed_checkpoint / "dpo_eval_training.json").read_text())
    orca, hh = (spec.source for spec in two_sources)
    assert [d["source"] for d in meta["datasets"]] == [orca, hh]
    by_source = meta["source_pair_ids"]
    assert len(by_source[orca]["train"]) == len(by_source[hh]["train"]) == meta["mix"][hh]["used"] > 0
    assert meta["mix"][orca]["weight"] == meta["mix"][hh]["weight"] == 0.5
    assert sorted(by_source[orca]["train"] + by_source[hh]["train"]) == sorted(meta["train_pair_ids"])
    assert sorted(by_source[orca]["valid"] + by_source[hh]["valid"]) == sorted(meta["valid_pair_ids"])
    pairs, _ = read_sources(two_sources)
    source_of = dict(pairs.select("pair_id", "source").iter_rows())
    assert all(source_of[p] == s for s in (orca, hh) for part in by_source[s].values() for p in part)


def test_evaluate_reports_per_source(harness, mixed_checkpoint, two_sources, stories260k, tmp_path):
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    small = tuple(spec.model_copy(update={"limit": 6}) for spec in two_sources)
    config = EvalConfig(dataset=small[0], extra_datasets=small[1:],
                        model=ModelSpec(base=str(stories260k), adapter=str(mixed_checkpoint), quantization="none",
                                        compute_dtype="float32"),
                        generation=GenerationSpec(max_new_tokens=6, batch_size=6),
                        scoring=ScoringSpec(cache_dir=tmp_path / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=50, permutations=50), out=tmp_path / "run")
    summary = evaluate_checkpoint(config)
    pairs = pl.read_parquet(tmp_path / "run" / "pairs.parquet")
    meta = json.loads((mixed_checkpoint / "dpo_eval_training.json").read_text())
    by_source = summary["by_source"]
    assert list(by_source) == [spec.source for spec in small]
    for source, result in by_source.items():
        mine = pairs.filter(pl.col("source") == source)
        trained = mine.filter(pl.col("pair_id").is_in(meta["source_pair_ids"][source]["train"]))
        assert result["n_pairs"].get("train", 0) == trained.height == (mine["split"] == "train").sum()
        assert sum(result["n_pairs"].values()) == mine.height == 6
        assert sum(r["n"] + r["skipped"] for r in result["implicit_reward"].values()) == 6
    assert {s: sum(r["n_pairs"].get(s, 0) for r in by_source.values()) for s in summary["n_pairs"]} == summary["n_pairs"]
    assert "Per data set" in (tmp_path / "run" / "report.html").read_text()
