"""Judge kind 1, the reward model: a tiny one trained here with trl's RewardTrainer (stories260k backbone,
orca train pairs), scoring a real run directory whose tuned answers come from a zero LoRA adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.reward_model import FEATURE, Item, RewardScorer, calibration, encode
from dpo_eval.stats.analysis import run_analysis
from dpo_eval.studies.reward_scores import reward_judge_run
from tests.builders import MISTRAL_LIKE_TEMPLATE, make_adapter

STEPS, MAX_LENGTH = 30, 128  # about 10 s on one core; 512 tokens (the full context) take ~100 s
ANSWERED = 24  # pairs answered by base and tuned (generation is the slow part on a CPU)
ANALYSIS = {"bootstrap": 300, "permutations": 300, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """On a shared 2-core machine one torch thread is many times faster than two contending ones."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reward-cache")


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, stories260k, orca_jsonl):
    from dpo_eval.training.reward import train_reward_model

    out = tmp_path_factory.mktemp("reward-model")
    started = time.perf_counter()
    metadata = train_reward_model(stories260k, orca_jsonl, out, steps=STEPS, batch_size=8, learning_rate=1e-3,
                                  max_length=MAX_LENGTH)
    print(f"\ntiny reward model: {STEPS} steps, max_length {MAX_LENGTH}, trained in "
          f"{time.perf_counter() - started:.1f} s, final train loss {metadata['train_loss']:.3f}")
    return out


def _features(pairs: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    """A features table of two cheap text statistics (the analysis reads any numeric columns)."""
    rows = [pairs.select("pair_id", "split", pl.lit(r).alias("role"), pl.col(r).alias("text"))
            for r in ("chosen", "rejected")]
    for model in ("base", "tuned"):
        part = answers.filter(pl.col("model") == model).select("pair_id", "answer")
        rows.append(pairs.select("pair_id", "split").join(part, on="pair_id").select(
            "pair_id", "split", pl.lit(model).alias("role"), pl.col("answer").alias("text")))
    return pl.concat(rows).select("pair_id", "split", "role",
                                  n_tokens=pl.col("text").str.split(" ").list.len().cast(pl.Float64),
                                  n_characters=pl.col("text").str.len_chars().cast(pl.Float64))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, stories260k, orca_jsonl):
    """A run directory: every orca pair, base and tuned answers (zero adapter: identical) to the first
    ANSWERED prompts, features, the run's analysis settings in config.json, stats and summary."""
    from dpo_eval.config import GenerationSpec, ModelSpec
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model
    from dpo_eval.report.page import write_outputs

    folder = tmp_path_factory.mktemp("run")
    adapter = make_adapter(stories260k, tmp_path_factory.mktemp("zero-adapter") / "adapter", zero=True)
    pairs, _ = read_pairs(str(orca_jsonl))
    loaded = load_model(ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none",
                                  compute_dtype="float32"))
    answers = generate_both(loaded, pairs.head(ANSWERED), GenerationSpec(max_new_tokens=12, batch_size=8))
    pairs.write_parquet(folder / "pairs.parquet")
    answers.write_parquet(folder / "answers.parquet")
    features = _features(pairs, answers)
    features.write_parquet(folder / "features.parquet")
    (folder / "config.json").write_text(json.dumps({"config": {"analysis": ANALYSIS}}))
    from dpo_eval.config import AnalysisSpec

    analysis = run_analysis(features, AnalysisSpec(**ANALYSIS))
    write_outputs(analysis.stats, analysis.summary | {"timings": {"score": 1.0}}, folder)
    return folder


@pytest.fixture(scope="module")
def judged(run_dir, reward_model, cache_dir):
    """The run before and after the reward model judged it, the summary block, and the reward model's folder."""
    before = pl.read_parquet(run_dir / "features.parquet")
    block = reward_judge_run(run_dir, reward_model, cache_dir=cache_dir)
    return before, block, reward_model


def reward_model_folder(judged) -> Path:
    return judged[2]


def test_valid_accuracy_is_reported_whatever_it_is(judged, run_dir):
    _, block, _ = judged
    pairs = pl.read_parquet(run_dir / "pairs.parquet")
    valid = block["splits"]["valid"]
    print(f"\ntiny reward model calibration on the valid split: accuracy {valid['accuracy']:.3f} "
          f"[{valid['ci_low']:.3f}, {valid['ci_high']:.3f}], n = {valid['n']}, ties {valid['ties']}; "
          f"train split: {block['splits']['train']['accuracy']:.3f} (n = {block['splits']['train']['n']})")
    assert valid["n"] == (pairs["split"] == "valid").sum()
    assert 0.0 <= valid["accuracy"] <= 1.0 and valid["ci_low"] <= valid["accuracy"] <= valid["ci_high"]
    # trained by train-reward on this data set's train split: the train row is in-sample, the valid row is not
    trained = set(json.loads((reward_model_folder(judged) / "dpo_eval_reward_training.json").read_text())["train_pair_ids"])
    assert block["splits"]["train"]["in_sample"] is True
    assert block["splits"]["train"]["trained_on"] == len(trained & set(pairs.filter(pl.col("split") == "train")["pair_id"]))
    assert (valid["in_sample"], valid["trained_on"]) == (False, 0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_model"]["id"] == block["id"]
    assert set(summary["reward_model"]["splits"]["valid"]) >= {"accuracy", "ci_low", "ci_high", "ties", "n", "win_rate",
                                                                "win_ci_low", "win_ci_high", "p_value"}
    assert summary["timings"]["score"] == 1.0 and "reward_model" in summary["timings"]  # earlier keys kept
    sections = json.loads((run_dir / "report_sections.json").read_text())
    assert [s["id"] for s in sections].count("reward_model") == 1
    assert "Calibration first" in (run_dir / "report.html").read_text()


def test_feature_joins_and_the_existing_analysis_applies(judged, run_dir):
    before, _, _ = judged
    after = pl.read_parquet(run_dir / "features.parquet")
    assert after.columns == before.columns + [FEATURE]
    assert after.drop(FEATURE).equals(before)  # the original columns' values, identical
    scored = after.filter(pl.col("role").is_in(["chosen", "rejected"]))
    assert scored[FEATURE].is_finite().all()
    stats = pl.read_parquet(run_dir / "stats.parquet")
    rows = stats.filter(pl.col("feature") == FEATURE)
    assert rows.height == 4 and set(rows["family"]) == {"reward_model"}  # 2 splits x 2 comparisons
    # the same numbers as run_analysis on the table: nothing new in the analysis
    from dpo_eval.config import AnalysisSpec

    direct = run_analysis(after, AnalysisSpec(**ANALYSIS)).stats.filter(pl.col("feature") == FEATURE)
    for column in ("n", "mean_delta", "norm_mean_delta", "scale", "p_value", "q_value", "effect_size",
                   "sign_agreement"):
        np.testing.assert_array_equal(rows[column].to_numpy(), direct[column].to_numpy())
    # the other features' tests are unchanged by the extra column (only the BH family grows)
    plain = run_analysis(before, AnalysisSpec(**ANALYSIS)).stats
    keys = ["feature", "split", "comparison"]
    both = plain.join(stats, on=keys, suffix="_new")
    for column in ("n", "mean_delta", "p_value", "effect_size"):
        np.testing.assert_array_equal(both[column].to_numpy(), both[f"{column}_new"].to_numpy())


def test_zero_adapter_gives_d_tb_exactly_zero(judged, run_dir):
    _, block, _ = judged
    features = pl.read_parquet(run_dir / "features.parquet")
    wide = features.pivot(on="role", index="pair_id", values=FEATURE).drop_nulls()
    assert wide.height == ANSWERED
    assert (wide["tuned"] - wide["base"] == 0).all()
    stats = pl.read_parquet(run_dir / "stats.parquet")
    tb = stats.filter((pl.col("feature") == FEATURE) & (pl.col("comparison") == "tuned_vs_base"))
    assert (tb["mean_delta"] == 0).all() and tb["n"].sum() == ANSWERED
    for split in ("train", "valid"):
        b = block["splits"][split]
        if b["win_n"]:
            assert (b["wins"], b["losses"], b["win_ties"], b["win_rate"]) == (0, 0, b["win_n"], 0.5)
            assert np.isnan(b["p_value"])  # no decided pair: no sign test


def test_rerun_scores_nothing_and_a_new_checkpoint_only_its_new_answers(judged, run_dir, reward_model, cache_dir):
    _, first, _ = judged
    assert first["scored"] > 0
    scorer = RewardScorer(reward_model, cache_dir=cache_dir)
    block = reward_judge_run(run_dir, reward_model, scorer=scorer)
    assert (block["scored"], block["cached"], scorer.loads) == (0, first["scored"] + first["cached"], 0)
    assert json.loads((run_dir / "summary.json").read_text())["cache"]["reward_model"] == {
        "hits": block["cached"], "misses": 0}
    # a new checkpoint: three tuned answers change, everything else is already scored
    answers = pl.read_parquet(run_dir / "answers.parquet")
    changed = answers.filter(pl.col("model") == "tuned")["pair_id"].head(3).to_list()
    answers.with_columns(answer=pl.when((pl.col("model") == "tuned") & pl.col("pair_id").is_in(changed))
                         .then(pl.col("answer") + " The end.").otherwise(pl.col("answer"))).write_parquet(
        run_dir / "answers.parquet")
    try:
        block = reward_judge_run(run_dir, reward_model, cache_dir=cache_dir)
        assert block["scored"] == 3
    finally:
        answers.write_parquet(run_dir / "answers.parquet")
        reward_judge_run(run_dir, reward_model, cache_dir=cache_dir)


def test_scores_are_deterministic_and_batch_size_independent(run_dir, reward_model, cache_dir):
    pairs = pl.read_parquet(run_dir / "pairs.parquet").head(12)
    items = [Item(r["system"], r["messages"], r[role]) for r in pairs.iter_rows(named=True)
             for role in ("chosen", "rejected")]
    one = RewardScorer(reward_model, batch_size=1, cache=False, cache_dir=cache_dir).score(items)
    eight = RewardScorer(reward_model, batch_size=8, cache=False, cache_dir=cache_dir).score(items)
    again = RewardScorer(reward_model, batch_size=8, cache=False, cache_dir=cache_dir).score(items)
    assert one.misses == len(items) and len(set(len(i.answer) for i in items)) > 1
    np.testing.assert_allclose(eight.score, one.score, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(eight.score, again.score)
    assert one.truncated.any()  # orca pairs are longer than 128 tokens: cut from the left, flagged


def test_long_sequences_are_cut_from_the_left_keeping_bos_and_the_answer_end(stories260k):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    prompt = json.dumps([{"role": "user", "content": "Tell me a story. " * 20}])
    item = Item("Be brief.", prompt, "Once upon a time. " * 30)
    full, cut, n = encode(tokenizer, item, 10_000)
    assert not cut and full[0] == tokenizer.bos_token_id and full.count(tokenizer.bos_token_id) == 1
    assert full[-1] == tokenizer.eos_token_id  # plain format: the answer then EOS, as trl appends it
    ids, cut, n_before = encode(tokenizer, item, 64)
    assert cut and n_before == len(full) and len(ids) == 64
    assert ids == [tokenizer.bos_token_id] + full[-63:]


def test_chat_template_renders_the_answer_as_assistant_turn_and_keys_the_cache(tmp_path, reward_model, cache_dir):
    import shutil

    from transformers import AutoTokenizer

    chat = shutil.copytree(reward_model, tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = MISTRAL_LIKE_TEMPLATE  # rejects a system role, as Mistral-Instruct's does
    tokenizer.save_pretrained(chat)
    item = Item("Be brief.", json.dumps([{"role": "user", "content": "Hi"}]), "Hello there.")
    scorer = RewardScorer(chat, cache_dir=cache_dir)
    assert scorer.key != RewardScorer(reward_model, cache_dir=cache_dir).key  # the template is part of the identity
    ids, _, _ = scorer.encode(item)
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>[INST] Be brief.\n\nHi [/INST]Hello there.</s>"
    assert ids.count(tokenizer.bos_token_id) == 1
    result = scorer.score([item])
    assert result.misses == 1 and np.isfinite(result.score).all()
    assert any("folded into the first user turn" in r for r in result.repairs)


def test_calibration_matches_numpy_and_binomtest():
    rng = np.random.default_rng(7)
    n = 60
    rows = []
    for i in range(n):
        split = "train" if i < 40 else "valid"
        c, r, b = rng.normal(size=3)
        r = c if i % 9 == 0 else r  # planted ties
        t = b if i % 7 == 0 else b + rng.normal()
        rows += [(f"p{i}", split, role, float(v))
                 for role, v in zip(("chosen", "rejected", "base", "tuned"), (c, r, b, t))]
    table = pl.DataFrame(rows, schema=["pair_id", "split", "role", FEATURE], orient="row")
    got = calibration(table, seed=5, n_boot=400, ci_level=0.9)
    for split in ("train", "valid"):
        part = table.filter(pl.col("split") == split).pivot(on="role", index="pair_id", values=FEATURE)
        cr = (part["chosen"] - part["rejected"]).to_numpy()
        tb = (part["tuned"] - part["base"]).to_numpy()
        b = got[split]
        assert b["n"] == cr.size and b["ties"] == int((cr == 0).sum()) > 0
        assert b["accuracy"] == np.mean(cr > 0)
        wins, losses = int((tb > 0).sum()), int((tb < 0).sum())
        assert (b["wins"], b["losses"], b["win_ties"]) == (wins, losses, int((tb == 0).sum()))
        assert b["win_rate"] == pytest.approx(np.mean(np.where(tb > 0, 1, np.where(tb == 0, 0.5, 0))), abs=1e-15)
        assert b["p_value"] == sps.binomtest(wins, wins + losses, 0.5).pvalue
        # the accuracy CI: Wilson's score interval at the 0.9 level, from its formula
        k, n, z = int((cr > 0).sum()), cr.size, sps.norm.ppf(0.95)
        centre, half = (k + z * z / 2) / (n + z * z), z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
        assert (b["ci_low"], b["ci_high"]) == pytest.approx((centre - half, centre + half), abs=1e-12)
        assert b["ci_low"] <= b["accuracy"] <= b["ci_high"] and b["win_ci_low"] <= b["win_rate"] <= b["win_ci_high"]
    assert calibration(table, seed=5, n_boot=400, ci_level=0.9) == got  # seeded


def test_two_output_classifier_and_a_causal_lm_are_refused(tmp_path, stories260k):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(stories260k, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "two")
    with pytest.raises(DpoEvalError, match="2 outputs .*a reward model has exactly one"):
        RewardScorer(tmp_path / "two")
    with pytest.raises(DpoEvalError, match="LlamaForCausalLM, not a sequence classifier"):
        RewardScorer(stories260k)


def test_cli_train_reward_and_judge_reward(tmp_path, run_dir, reward_model, cache_dir, stories260k, orca_jsonl,
                                           capsys, monkeypatch):
    from typer.testing import CliRunner

    from dpo_eval.cli.main import app
    from dpo_eval.cli.reward import judge_reward

    result = CliRunner().invoke(app, ["train-reward", "--base", str(stories260k), "--dataset", str(orca_jsonl),
                                      "--out", str(tmp_path / "rm"), "--steps", "2", "--max-length", "48",
                                      "--limit", "40"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rm" / "dpo_eval_reward_training.json").is_file()
    monkeypatch.setenv("DPO_EVAL_CACHE", str(cache_dir))
    through_judge = CliRunner().invoke(app, ["judge", str(run_dir), "--reward-model", str(reward_model), "--split",
                                             "valid", "--limit", "5"])  # the shared judge command
    assert through_judge.exit_code == 0, through_judge.output
    assert "valid: calibration: accuracy on chosen vs rejected" in through_judge.output
    both = CliRunner().invoke(app, ["judge", str(run_dir), "--reward-model", str(reward_model), "--judge-model", "x"])
    assert both.exit_code != 0 and "not both" in str(both.exception or both.output)
    block = judge_reward(run_dir, str(reward_model), split="valid", limit=5)
    out = capsys.readouterr().out
    assert "valid: calibration: accuracy on chosen vs rejected" in out and block["scored"] == 0
    assert set(block["splits"]) == {"valid"} and block["splits"]["valid"]["n"] == 5
    with pytest.raises(DpoEvalError, match="--split test"):
        judge_reward(run_dir, str(reward_model), split="test")
    reward_judge_run(run_dir, reward_model, cache_dir=cache_dir)  # leave the run fully scored


def test_accuracy_ci_is_not_zero_width_when_every_pair_is_right():
    """29 correct of 29: a bootstrap would say [1, 1]; Wilson's interval says how few pairs that is."""
    rows = [{"pair_id": f"p{i}", "split": "valid", "role": role, FEATURE: value}
            for i in range(29) for role, value in (("chosen", 1.0 + i), ("rejected", 0.0),
                                                    ("tuned", 0.5), ("base", 0.25))]
    block = calibration(pl.DataFrame(rows), seed=0, n_boot=200, ci_level=0.95)["valid"]
    assert block["accuracy"] == 1.0 and block["ci_high"] == pytest.approx(1.0)
    expected = sps.binomtest(29, 29).proportion_ci(0.95, method="wilson").low
    assert block["ci_low"] == pytest.approx(expected) and block["ci_low"] < 0.9
