"""Quantization study (issue 17): 4bit, 8bit and none on stories260k through the real evaluation flow, with
real bitsandbytes 4-bit and 8-bit layers on the CPU."""

from __future__ import annotations

import json

import polars as pl
import pytest

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.studies.quantization import identical_answers, reward_shift
from tests.builders import make_adapter

N = 8


@pytest.fixture(scope="module")
def study(harness, tmp_path_factory, stories260k):
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    from dpo_eval.data.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("quant")
    adapter = make_adapter(stories260k, root / "adapter", zero=False, seed=3)
    data = write_demo_dataset(root / "pairs.jsonl", n=N)  # short story texts: quick log-probs on the CPU
    config = EvalConfig(dataset=DatasetSpec(source=str(data)),
                        model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit"),
                        generation=GenerationSpec(max_new_tokens=8, batch_size=N),
                        scoring=ScoringSpec(cache_dir=root / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=50, permutations=50), out=root / "run",
                        quantization_study=("8bit", "none"))
    return {"summary": evaluate_checkpoint(config), "run": root / "run", "root": root}


def test_every_setting_runs_and_is_compared_with_4bit(study):
    run = study["run"]
    result = json.loads((run / "quantization.json").read_text())
    assert result["reference"] == "4bit" and list(result["settings"]) == ["8bit", "none"]
    keys = set()
    for setting, row in result["settings"].items():
        sub = run / "quantization" / setting
        config = json.loads((sub / "config.json").read_text())
        assert config["config"]["model"]["quantization"] == setting
        assert config["model_identity"]["loading"]["quantization"] == setting
        keys.add(config["fingerprint"])
        assert (run / "quantization" / f"{setting}-vs-4bit" / "report.html").is_file()
        same = row["identical_answers"]
        assert same["n"] == N and 0 <= same["tuned"] <= N and 0 <= same["base"] <= N
        assert set(row["features_moved"]) == {"train", "valid"}
        assert all(0 <= k <= row["n_features"] for k in row["features_moved"].values())
        assert sum(r["n"] + r["skipped"] for r in row["implicit_reward"].values()) == N
        # the answers counted identical are the ones the two runs' files hold
        mine = pl.read_parquet(sub / "answers.parquet").filter(pl.col("model") == "tuned").sort("pair_id")
        main = pl.read_parquet(run / "answers.parquet").filter(pl.col("model") == "tuned").sort("pair_id")
        assert same["tuned"] == int((mine["answer"] == main["answer"]).sum())
        # another quantization computes other log-probabilities: the margins move, if only a little
        assert row["reward_shift"]["n"] > 0 and row["reward_shift"]["margin_max_abs_diff"] > 0
    main_key = json.loads((run / "config.json").read_text())["fingerprint"]
    assert len(keys | {main_key}) == 3  # each setting is cached under its own model identity
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantization"]["settings"]["none"]["identical_answers"]["n"] == N
    assert "Quantization study (against 4bit)" in (run / "report.html").read_text()


def test_none_against_none_is_identical(study):
    """The same setting's answers and rewards against themselves (test_compare covers a run's features against
    themselves: no feature moves)."""
    none = study["run"] / "quantization" / "none"
    assert identical_answers(none, none) == {"tuned": N, "base": N, "n": N}
    assert reward_shift(none, none) == {"n": N, "margin_max_abs_diff": 0.0, "same_verdict": 1.0}


def test_a_setting_given_twice_is_named(tmp_path, capsys, stories260k, orca_jsonl):
    from dpo_eval.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--base", str(stories260k), "--adapter", str(tmp_path), "--dataset", str(orca_jsonl),
              "--quantization", "4bit,none,4bit", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "--quantization 4bit,none,4bit: 4bit is given twice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="4bit given twice"):
        EvalConfig(dataset=DatasetSpec(source=str(orca_jsonl)), model=ModelSpec(base=str(stories260k)),
                   quantization_study=("none", "4bit"))
