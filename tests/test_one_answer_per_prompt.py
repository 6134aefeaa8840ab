"""Tuned and base answers are generated once per distinct prompt (system, turns), and the tuned-vs-base tests
count each prompt once; chosen vs rejected stays per pair. Statistics against scipy on one delta per prompt;
generation counted on the real stories260k."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval import stages
from dpo_eval.config import AnalysisSpec, DatasetSpec, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.data.pairs import hash_split, read_pairs
from dpo_eval.stats.analysis import run_analysis
from tests.builders import make_adapter

FAST = AnalysisSpec(bootstrap=0, permutations=0)
STORIES = ["Once upon a time", "Lily had a red ball.", "The dog ran", "Tom", "A big tree stood in the park.",
           "The sun was hot and the children wanted to swim in the lake."]

# 6 prompts, the first two with 2 pairs each: 8 pairs
PROMPT_OF = [0, 0, 1, 1, 2, 3, 4, 5]
D_CR = [1.3, 0.4, 2.2, -0.7, 1.9, 0.55, 2.8, -0.25]  # chosen - rejected per pair: no ties
# tuned - base per prompt: counted once, the mean is negative; counted per pair (prompts 0 and 1 twice) positive
D_TB = [2.1, 1.7, -0.9, -1.35, -1.2, -1.6]
D_LEN = [4.0, 1.0, -2.0, 3.0, -5.0, 0.5]  # n_tokens tuned - base per prompt


def duplicated_prompt_features(with_prompt_id: bool = True) -> pl.DataFrame:
    """features.parquet's shape: per pair, chosen and rejected of its own; tuned and base shared by its prompt."""
    rows = []
    for i, k in enumerate(PROMPT_OF):
        keys = {"pair_id": f"p{i}", "split": "train"} | ({"prompt_id": f"q{k}"} if with_prompt_id else {})
        rows += [keys | {"role": "chosen", "x": 10.0 + D_CR[i], "n_tokens": 50.0 + i},
                 keys | {"role": "rejected", "x": 10.0, "n_tokens": 40.0},
                 keys | {"role": "tuned", "x": 5.0 + D_TB[k], "n_tokens": 30.0 + D_LEN[k]},
                 keys | {"role": "base", "x": 5.0, "n_tokens": 30.0}]
    return pl.DataFrame(rows)


def stat_row(stats: pl.DataFrame, feature: str, comparison: str) -> dict:
    return stats.filter((pl.col("feature") == feature) & (pl.col("comparison") == comparison)
                        & (pl.col("split") == "train")).row(0, named=True)


def test_tuned_vs_base_is_scipys_wilcoxon_on_one_delta_per_prompt_and_chosen_vs_rejected_stays_per_pair():
    result = run_analysis(duplicated_prompt_features(), FAST)
    d_tb, d_cr, d_len = np.array(D_TB), np.array(D_CR), np.array(D_LEN)
    tb, cr = stat_row(result.stats, "x", "tuned_vs_base"), stat_row(result.stats, "x", "chosen_vs_rejected")

    assert tb["n"] == 6  # prompts, not the 8 pairs
    expected = sps.wilcoxon(d_tb)  # exact: 6 deltas, no ties
    assert tb["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert tb["wilcoxon_stat"] == expected.statistic
    scale = np.std(d_cr, ddof=1)  # S_j over the train pairs
    assert tb["scale"] == pytest.approx(scale) and cr["scale"] == pytest.approx(scale)
    assert tb["mean_delta"] == pytest.approx(d_tb.mean())
    assert tb["norm_mean_delta"] == pytest.approx(d_tb.mean() / scale)

    assert cr["n"] == 8  # chosen vs rejected: every pair has its own texts
    assert cr["p_value"] == pytest.approx(sps.wilcoxon(d_cr).pvalue, rel=1e-12)
    assert cr["mean_delta"] == pytest.approx(d_cr.mean())

    # sign agreement: sign(mean d_cr over pairs) * sign(mean d_tb over prompts); per pair d_tb's mean is > 0
    assert d_tb.mean() < 0 < d_tb[PROMPT_OF].mean() and d_cr.mean() > 0
    assert tb["sign_agreement"] == cr["sign_agreement"] == -1.0
    assert result.summary["sign_agreement"]["train"] == 0.5  # x disagrees, n_tokens agrees

    # length-adjusted: the prompt's delta regressed on the prompt's own n_tokens delta (6 points)
    fit = sps.linregress(d_len, d_tb)
    assert tb["length_adjusted_delta"] == pytest.approx(fit.intercept)
    p = 2 * sps.t.sf(abs(fit.intercept / fit.intercept_stderr), 6 - 2)
    assert tb["length_adjusted_p"] == pytest.approx(p, rel=1e-9)
    assert result.summary["length_sign_share"]["train"] == pytest.approx(4 / 6)

    assert result.summary["n_pairs"] == {"train": 8, "valid": 0}
    assert result.summary["n_prompts"] == {"train": 6, "valid": 0}
    assert result.summary["power"]["train"]["n"] == 6


def test_a_features_table_without_prompt_id_counts_every_pair():
    """Written before prompt_id (or by another tool): each pair its own prompt, as before."""
    stats = run_analysis(duplicated_prompt_features(with_prompt_id=False), FAST).stats
    tb = stat_row(stats, "x", "tuned_vs_base")
    assert tb["n"] == 8
    assert tb["mean_delta"] == pytest.approx(np.array(D_TB)[PROMPT_OF].mean())


def test_a_prompts_pairs_whose_answers_differ_count_once_with_their_mean_delta():
    """Answers generated per pair (an older run): the prompt counts once, with the mean of its pairs' deltas."""
    features = duplicated_prompt_features().with_columns(
        pl.when((pl.col("pair_id") == "p1") & (pl.col("role") == "tuned")).then(pl.col("x") + 1.0)
        .otherwise(pl.col("x")).alias("x"))
    per_prompt = np.array(D_TB)
    per_prompt[0] += 0.5  # (d + (d + 1)) / 2
    tb = stat_row(run_analysis(features, FAST).stats, "x", "tuned_vs_base")
    assert tb["n"] == 6
    assert tb["p_value"] == pytest.approx(sps.wilcoxon(per_prompt).pvalue, rel=1e-12)
    assert tb["mean_delta"] == pytest.approx(per_prompt.mean())


def test_questions_without_labels_count_each_prompt_once():
    features = duplicated_prompt_features().filter(pl.col("role").is_in(["tuned", "base"]))
    result = run_analysis(features, FAST)
    tb = stat_row(result.stats, "x", "tuned_vs_base")
    assert tb["n"] == 6
    assert tb["p_value"] == pytest.approx(sps.wilcoxon(np.array(D_TB)).pvalue, rel=1e-12)
    assert result.summary["n_prompts"]["train"] == 6


def write_pairs(folder) -> pl.DataFrame:
    """8 records of the 6 story prompts, the first two asked twice with other chosen and rejected answers."""
    path = folder / "pairs.jsonl"
    records = [{"prompt": STORIES[k], "chosen": f"chosen {i}", "rejected": f"rejected {i}"}
               for i, k in enumerate(PROMPT_OF)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return read_pairs(DatasetSpec(source=str(path)))[0]


@pytest.fixture(scope="module")
def model_spec(stories260k, tmp_path_factory) -> ModelSpec:
    adapter = make_adapter(stories260k, tmp_path_factory.mktemp("adapter") / "adapter", zero=False, seed=1)
    return ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none", compute_dtype="float32")


def test_each_distinct_prompt_is_generated_once_per_model_and_its_pairs_share_the_answer(model_spec, tmp_path,
                                                                                        monkeypatch):
    """The flow's stages (shard_pairs, generate_shard) on the real stories260k, sampling: 6 prompts, 8 pairs."""
    pairs = write_pairs(tmp_path)
    gen = GenerationSpec(max_new_tokens=12, batch_size=4, do_sample=True, temperature=1.0, seed=3)
    identity = stages.model_identity(model_spec)
    loaded = stages.cached_model(model_spec, identity, gen.engine, gen.merge)  # the model generate_shard uses
    rows_generated = []
    real_generate = loaded.model.generate

    def counted(*args, **kwargs):
        rows_generated.append(int(kwargs["input_ids"].shape[0]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", counted)
    shards = stages.shard_pairs(pairs, 2)  # 4 buckets for 8 pairs
    assert len(shards) > 1
    for shard in shards:  # a prompt's pairs share a shard, so a shard can generate the prompt once
        prompts_here = set(shard["prompt"].to_list())
        assert pairs.filter(pl.col("prompt").is_in(list(prompts_here))).height == shard.height
    progress = {"base": 0, "tuned": 0}
    frames = []
    for model in ("base", "tuned"):
        for shard in shards:
            answers, _ = stages.generate_shard(model_spec, gen, shard, model, identity.key(model),
                                               on_batch=lambda n, m=model: progress.__setitem__(m, progress[m] + n))
            frames.append(answers)
    stages.release_models()
    answers = pl.concat(frames)

    assert sum(rows_generated) == 12  # 6 prompts x 2 models, not 8 pairs x 2
    assert progress == {"base": 6, "tuned": 6}
    assert answers.height == 16  # still one row per pair and model
    assert sorted(answers.filter(pl.col("model") == "base")["pair_id"].to_list()) == sorted(pairs["pair_id"].to_list())
    joined = answers.join(pairs.select("pair_id", "prompt"), on="pair_id")
    per_prompt = joined.group_by("model", "prompt").agg(pl.col("answer").n_unique().alias("answers"),
                                                        pl.len().alias("pairs"))
    assert per_prompt["answers"].to_list() == [1] * 12  # the two pairs of a prompt share one sampled answer
    assert sorted(per_prompt["pairs"].to_list()) == [1] * 8 + [2] * 4
    assert joined.filter(pl.col("model") == "tuned")["answer"].n_unique() > 1  # really sampled per prompt


def test_features_carry_the_prompt_and_the_run_counts_each_prompt_once(model_spec, tmp_path):
    """generate_both -> texts_of -> scoring -> features_table -> run_analysis, as the flow wires them."""
    from dpo_eval.data.pairs import prompt_key
    from dpo_eval.generation.generate import generate_both

    pairs = write_pairs(tmp_path)
    gen = GenerationSpec(max_new_tokens=12, batch_size=8)
    answers = generate_both(stages.cached_model(model_spec, None, gen.engine, gen.merge), pairs, gen)
    stages.release_models()
    texts = stages.texts_of(pairs, answers)
    scores, _ = stages.score_frame(texts, ScoringSpec(cache_dir=tmp_path / "scores", n_process=1))
    features = stages.features_table(texts, scores)

    ids = features.select("pair_id", "prompt_id").unique().join(pairs.select("pair_id", "prompt", "split"),
                                                                  on="pair_id")
    assert ids.height == 8 and ids["prompt_id"].n_unique() == 6
    for row in ids.iter_rows(named=True):  # the key the split was drawn by: (system, turns)
        assert row["prompt_id"] == prompt_key("", [("user", row["prompt"])])
        assert row["split"] == hash_split(row["prompt_id"], DatasetSpec.model_fields["seed"].default,
                                          DatasetSpec.model_fields["valid_fraction"].default)
    stats = run_analysis(features, FAST).stats
    for split in ids["split"].unique().to_list():
        in_split = ids.filter(pl.col("split") == split)
        part = stats.filter(pl.col("split") == split)
        assert part.filter(pl.col("comparison") == "tuned_vs_base")["n"].max() == in_split["prompt_id"].n_unique()
        assert part.filter(pl.col("comparison") == "chosen_vs_rejected")["n"].max() == in_split.height
