"""The evaluation's plain stages: hash-bucketed shards and the identity-keyed model cache."""

from __future__ import annotations

import json
import shutil

import polars as pl

from dpo_eval import stages
from dpo_eval.config import GenerationSpec, ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.generate import generate_both
from dpo_eval.generation.models import load_model
from tests.builders import make_adapter


def pairs_of(n: int, start: int = 0) -> pl.DataFrame:
    ids = [f"pair-{i}" for i in range(start, start + n)]
    return pl.DataFrame({"pair_id": ids, "split": ["train"] * n, "system": [""] * n, "prompt": ids,
                         "chosen": ["c"] * n, "rejected": ["r"] * n,
                         "messages": [json.dumps([{"role": "user", "content": i}]) for i in ids]})


def test_shards_cover_every_pair_once_and_stay_near_the_size():
    pairs = pairs_of(1000)
    shards = stages.shard_pairs(pairs, 64)
    ids = [p for s in shards for p in s["pair_id"].to_list()]
    assert sorted(ids) == sorted(pairs["pair_id"].to_list())
    assert len(shards) == 16  # 1000 / 64 = 15.6 -> the next power of two
    assert all(10 < s.height < 130 for s in shards)
    assert stages.shard_pairs(pairs.head(0), 64) == []
    assert len(stages.shard_pairs(pairs.head(3), 64)) == 1


def test_adding_a_record_changes_one_shard_only():
    pairs = pairs_of(1000)
    before = {stages.content_hash(s) for s in stages.shard_pairs(pairs, 64)}
    after = {stages.content_hash(s) for s in stages.shard_pairs(pl.concat([pairs, pairs_of(1, 5000)]), 64)}
    assert len(after - before) == 1 and len(before - after) == 1
    # consecutive slicing, as before: every shard after the insertion point would have moved
    shifted = pl.concat([pairs_of(1, 5000), pairs])
    assert len({stages.content_hash(s) for s in stages.shard_pairs(shifted, 64)} - before) == 1


def test_a_checkpoint_rewritten_at_the_same_path_is_loaded_again(stories260k, tmp_path):
    """The in-process model cache is keyed on the identity, not the path (`/checkpoints/latest`)."""
    from tests.test_models_generation import story_pairs

    spec = ModelSpec(base=str(stories260k), adapter=str(tmp_path / "latest"), quantization="none",
                     compute_dtype="float32")
    gen = GenerationSpec(max_new_tokens=10)
    make_adapter(stories260k, tmp_path / "latest", zero=False, seed=1)
    first_key = stages.model_identity(spec).tuned_key
    first, _ = stages.generate_shard(spec, gen, story_pairs(), "tuned", first_key)
    shutil.rmtree(tmp_path / "latest")
    make_adapter(stories260k, tmp_path / "latest", zero=False, seed=2)
    # the run that identified the old files must not store new answers under the old key
    try:
        stages.generate_shard(spec, gen, story_pairs(), "tuned", first_key)
        raise AssertionError("generated under a stale identity key")
    except DpoEvalError as exc:
        assert "changed since this run identified them" in str(exc)
    second_key = stages.model_identity(spec).tuned_key
    second, _ = stages.generate_shard(spec, gen, story_pairs(), "tuned", second_key)
    fresh = generate_both(load_model(spec), story_pairs(), gen, models=("tuned",))
    assert second["worker"].unique().to_list() == [stages.worker_label()]  # made in this process
    second = second.drop("worker")
    assert second_key != first_key and second.equals(fresh) and not second.equals(first.drop("worker"))
    stages.release_models()


def test_a_checkpoint_split_by_pair_is_used_as_recorded_and_its_straddling_prompts_said(tmp_path):
    from dpo_eval.checkpoint_meta import METADATA

    pairs = pl.DataFrame({"pair_id": ["a1", "a2", "b1", "b2"], "split": ["train"] * 4, "system": [""] * 4,
                          "prompt": ["A", "A", "B", "B"], "messages": ['[{"role": "user", "content": "A"}]'] * 2
                          + ['[{"role": "user", "content": "B"}]'] * 2})
    adapter = tmp_path / "checkpoint-1"
    adapter.mkdir()
    (adapter / METADATA).write_text(json.dumps({"train_pair_ids": ["a1", "b1", "b2"]}))  # split by pair: A straddles
    split, source = stages.apply_training_split(pairs, str(adapter))
    assert split["split"].to_list() == ["train", "valid", "train", "train"]  # as recorded
    assert "1 prompt(s) have pairs on both sides" in source
    (adapter / METADATA).write_text(json.dumps({"train_pair_ids": ["a1", "a2"]}))  # by prompt: nothing to say
    assert stages.apply_training_split(pairs, str(adapter))[1] == "checkpoint training metadata"


def prompts_asked_twice() -> pl.DataFrame:
    """40 pairs over 30 prompts: prompts 0..9 asked twice (pair ids far apart, so pair_id buckets part them)."""
    pairs = pairs_of(40)
    prompt = [f"pair-{i % 30}" for i in range(40)]
    return pairs.with_columns(pl.Series("prompt", prompt),
                              pl.Series("messages", [json.dumps([{"role": "user", "content": p}]) for p in prompt]))


def test_a_prompts_pairs_share_a_shard_and_distinct_prompts_shard_as_by_pair_id():
    from dpo_eval.data.pairs import prompt_ids

    distinct = pairs_of(300)
    by_pair_id = {}  # the shards of bucketing each pair by its own pair_id (earlier caches were keyed on them)
    for pid in distinct["pair_id"].to_list():
        by_pair_id.setdefault(stages.shard_of(pid, 8), []).append(pid)
    shards = stages.shard_pairs(distinct, 64)
    assert [s["pair_id"].to_list() for s in shards] == [by_pair_id[b] for b in sorted(by_pair_id)]

    twice = prompts_asked_twice()
    shards = stages.shard_pairs(twice, 8)
    assert len(shards) > 1 and sum(s.height for s in shards) == 40
    home = {}
    for k, shard in enumerate(shards):
        for key in prompt_ids(shard):
            assert home.setdefault(key, k) == k  # never in two shards


def test_a_shard_that_repeats_a_prompt_is_keyed_apart_and_one_with_distinct_prompts_as_before():
    from dpo_eval.generation import generate
    from dpo_eval.tasks.evaluation import _generation_key

    gen = GenerationSpec()

    def key(shard):
        return _generation_key(None, {"key": "k", "generation": gen, "model": "base", "shard": shard})

    def earlier_key(shard):  # the key before one answer per prompt
        return "generate-" + "-".join(["k", stages.spec_hash(gen), "base", stages.content_hash(shard),
                                       generate.CODE_VERSION])

    distinct = pairs_of(5)
    assert key(distinct) == earlier_key(distinct)  # its cached answers still hit: they are the same answers
    repeated = prompts_asked_twice().slice(25, 10)  # pairs 25..34: prompts 25..29 and 0..4, none repeated
    assert key(repeated) == earlier_key(repeated)
    repeated = prompts_asked_twice().slice(0, 35)  # prompts 0..4 asked twice
    assert key(repeated) != earlier_key(repeated)
    assert generate.SHARED_ANSWERS in key(repeated)
