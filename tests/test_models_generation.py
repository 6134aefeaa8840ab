"""Loading and generation on stories260k and on a tiny random Mistral-shaped model, no mocks."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from dpo_eval.config import GenerationSpec, ModelSpec
from dpo_eval.data.pairs import load_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.generate import encode_prompts, generate_answers, generate_both
from dpo_eval.generation.models import load_model
from dpo_eval.generation.prompts import PromptFormatter
from tests.builders import make_adapter, tiny_mistral

GEN = GenerationSpec(max_new_tokens=12, batch_size=4)


def story_pairs(n: int = 6) -> pl.DataFrame:
    prompts = ["Once upon a time", "Lily had a red ball.", "The dog ran", "Tom", "A big tree stood in the park.",
               "The sun was hot and the children wanted to swim in the lake."]
    return pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "split": ["train"] * n, "system": [""] * n,
                         "prompt": prompts[:n], "chosen": ["c"] * n, "rejected": ["r"] * n,
                         "messages": [json.dumps([{"role": "user", "content": p}]) for p in prompts[:n]]})


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, request):
    from tests.conftest import shared_path

    stories = shared_path("models/stories260k")
    root = tmp_path_factory.mktemp("adapters")
    return {"zero": make_adapter(stories, root / "zero", zero=True),
            "trained": make_adapter(stories, root / "trained", zero=False)}


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from tests.conftest import shared_path

    return tiny_mistral(tmp_path_factory.mktemp("mistral") / "tiny-mistral", shared_path("models/stories260k"))


def test_4bit_loading_gives_bitsandbytes_layers_and_generates(stories260k, adapters):
    import bitsandbytes as bnb

    loaded = load_model(ModelSpec(base=str(stories260k), adapter=str(adapters["trained"]), quantization="4bit"))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()) >= 30
    answers = generate_both(loaded, story_pairs(3), GEN)
    assert answers.height == 6 and set(answers["model"]) == {"tuned", "base"}
    assert (answers["n_new_tokens"] > 0).all() and answers["answer"].str.len_chars().min() > 0


def test_8bit_loading_gives_bitsandbytes_int8_layers(stories260k):
    import bitsandbytes as bnb

    loaded = load_model(ModelSpec(base=str(stories260k), quantization="8bit"))
    assert sum(isinstance(m, bnb.nn.Linear8bitLt) for m in loaded.model.modules()) >= 30
    assert generate_both(loaded, story_pairs(2), GEN)["n_new_tokens"].min() > 0


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_base_under_disable_adapter_equals_plain_base(stories260k, adapters, quantization):
    pairs = story_pairs()
    spec = ModelSpec(base=str(stories260k), quantization=quantization, compute_dtype="float32")
    plain = generate_both(load_model(spec), pairs, GEN)
    with_adapter = generate_both(load_model(spec.model_copy(update={"adapter": str(adapters["trained"])})), pairs, GEN)
    assert with_adapter.filter(pl.col("model") == "base").equals(plain)


def test_nonzero_adapter_changes_answers_and_zero_adapter_does_not(stories260k, adapters):
    pairs = story_pairs()
    base = ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32")
    trained = generate_both(load_model(base.model_copy(update={"adapter": str(adapters["trained"])})), pairs, GEN)
    zero = generate_both(load_model(base.model_copy(update={"adapter": str(adapters["zero"])})), pairs, GEN)
    answers = lambda t, m: t.filter(pl.col("model") == m)["answer"].to_list()  # noqa: E731
    assert answers(trained, "tuned") != answers(trained, "base")
    assert answers(zero, "tuned") == answers(zero, "base")


def test_batched_greedy_equals_one_at_a_time(stories260k):
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    pairs = story_pairs()
    batched = generate_answers(loaded.model, loaded.tokenizer, pairs, GenerationSpec(max_new_tokens=20, batch_size=6))
    single = generate_answers(loaded.model, loaded.tokenizer, pairs, GenerationSpec(max_new_tokens=20, batch_size=1))
    assert batched.equals(single)
    assert batched["pair_id"].to_list() == pairs["pair_id"].to_list()  # input order back


def test_sampling_is_repeatable_with_a_seed(stories260k):
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    spec = GenerationSpec(max_new_tokens=16, do_sample=True, temperature=1.0, seed=3)
    a = generate_answers(loaded.model, loaded.tokenizer, story_pairs(), spec)
    b = generate_answers(loaded.model, loaded.tokenizer, story_pairs(), spec)
    c = generate_answers(loaded.model, loaded.tokenizer, story_pairs(), spec.model_copy(update={"seed": 4}))
    assert a.equals(b) and not a.equals(c)


def test_sampled_answers_do_not_depend_on_batch_size_or_neighbours(stories260k):
    """Each prompt is seeded from the run's seed and its pair: an OOM retry with half the batch, or the
    same pair in another shard, samples the same answer."""
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    spec = GenerationSpec(max_new_tokens=16, do_sample=True, temperature=1.0, seed=3, batch_size=6)
    pairs = story_pairs()
    whole = generate_answers(loaded.model, loaded.tokenizer, pairs, spec)
    halves = generate_answers(loaded.model, loaded.tokenizer, pairs, spec.model_copy(update={"batch_size": 3}))
    alone = generate_answers(loaded.model, loaded.tokenizer, pairs.slice(2, 1), spec.model_copy(update={"batch_size": 1}))
    assert whole.equals(halves)
    assert alone["answer"][0] == whole["answer"][2]
    assert whole["answer"].n_unique() > 1  # really sampled per prompt


def test_a_batch_over_the_token_budget_fails_as_out_of_memory(stories260k):
    import torch

    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    pairs = story_pairs()
    spec = GenerationSpec(max_new_tokens=8, batch_size=6, max_batch_tokens=40)
    with pytest.raises(torch.OutOfMemoryError, match="max_batch_tokens=40"):
        generate_answers(loaded.model, loaded.tokenizer, pairs, spec)
    fits = generate_answers(loaded.model, loaded.tokenizer, pairs, spec.model_copy(update={"batch_size": 1}))
    assert fits.equals(generate_answers(loaded.model, loaded.tokenizer, pairs, GenerationSpec(max_new_tokens=8)))


def test_repairs_on_stories260k(stories260k):
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    formatter = PromptFormatter(loaded.tokenizer, repairs=loaded.repairs)
    prompts = encode_prompts(formatter, story_pairs(), 100)
    assert loaded.tokenizer.pad_token == "<unk>"
    assert any("no pad token" in r for r in loaded.repairs)
    assert any("no chat template: plain prompt format" in r for r in loaded.repairs)
    for p in prompts:
        assert p.ids[0] == 1 and p.ids.count(1) == 1


def test_repairs_on_mistral_shaped_model(mistral):
    loaded = load_model(ModelSpec(base=str(mistral), quantization="none", compute_dtype="float32"))
    assert loaded.tokenizer.padding_side == "left"
    assert any("padding side set to left" in r for r in loaded.repairs)
    pairs = story_pairs(3).with_columns(pl.lit("You are a storyteller.").alias("system"))
    formatter = PromptFormatter(loaded.tokenizer, repairs=loaded.repairs)
    text = formatter.render("You are a storyteller.", [{"role": "user", "content": "Tell me a story."}])
    assert text.startswith("<s>[INST] You are a storyteller.\n\nTell me a story. [/INST]")
    assert any("rejects the system role" in r for r in loaded.repairs)
    prompts = encode_prompts(formatter, pairs, 200)
    for p in prompts:  # the template renders <s>; re-tokenizing must not add a second one
        assert p.ids[0] == 1 and p.ids.count(1) == 1
    assert any("no second BOS" in r for r in loaded.repairs)
    answers = generate_both(loaded, pairs, GEN)
    assert answers.height == 3


def test_long_orca_prompts_are_truncated_from_the_left_and_flagged(stories260k, orca_jsonl):
    pairs = load_pairs(str(orca_jsonl)).head(12)
    loaded = load_model(ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32"))
    answers = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=8, batch_size=6))
    assert answers.height == 12  # nothing dropped
    assert answers["truncated"].any() and (answers["n_prompt_tokens"] <= 512 - 8).all()
    assert answers.filter(pl.col("truncated"))["n_prompt_tokens"].min() == 504
    formatter = PromptFormatter(loaded.tokenizer)
    full = loaded.tokenizer(formatter.render(pairs["system"][0], [{"role": "user", "content": pairs["prompt"][0]}]),
                            add_special_tokens=False)["input_ids"]
    cut = formatter.encode(formatter.render(pairs["system"][0], [{"role": "user", "content": pairs["prompt"][0]}]), 50)
    assert cut.truncated and cut.ids == [1] + full[-49:]  # the end of the prompt is kept
    assert any("truncated from the left" in r for r in loaded.repairs)


def test_bad_inputs_fail_before_generation(stories260k, mistral, adapters, tmp_path):
    with pytest.raises(DpoEvalError, match="--base .*nowhere: no such model folder"):
        load_model(ModelSpec(base=str(tmp_path / "nowhere")))
    with pytest.raises(DpoEvalError, match="--adapter .*missing: no such adapter folder"):
        load_model(ModelSpec(base=str(stories260k), adapter=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DpoEvalError, match="no adapter_config.json"):
        load_model(ModelSpec(base=str(stories260k), adapter=str(tmp_path / "empty")))
    # an adapter for stories260k (hidden 64) on a base with hidden 96: shapes do not fit
    with pytest.raises(DpoEvalError, match="trained for base .*stories260k.*does not fit.*tiny-mistral"):
        load_model(ModelSpec(base=str(mistral), adapter=str(adapters["trained"]), quantization="none"))
    with pytest.raises(Exception, match="quantization"):
        ModelSpec(base=str(stories260k), quantization="3bit")


def test_adapter_for_another_name_with_fitting_shapes_warns(stories260k, adapters, tmp_path):
    import shutil

    copy = tmp_path / "stories-copy"
    shutil.copytree(stories260k, copy)
    with pytest.warns(UserWarning, match="trained on"):
        loaded = load_model(ModelSpec(base=str(copy), adapter=str(adapters["zero"]), quantization="none"))
    assert any(r.startswith("warning: adapter") for r in loaded.repairs)


def test_fingerprints_are_the_model_identity(stories260k, adapters):
    a = load_model(ModelSpec(base=str(stories260k), adapter=str(adapters["zero"]), quantization="none"))
    b = load_model(ModelSpec(base=str(stories260k), adapter=str(adapters["trained"]), quantization="none"))
    c = load_model(ModelSpec(base=str(stories260k), adapter=str(adapters["zero"]), quantization="4bit"))
    assert a.base_fingerprint == b.base_fingerprint and a.fingerprint != b.fingerprint
    assert a.base_fingerprint != c.base_fingerprint
    assert a.identity.tuned_key == a.fingerprint and a.identity.adapter is not None


def test_cli_generate(stories260k, adapters, orca_jsonl, tmp_path):
    out = tmp_path / "answers.parquet"
    result = subprocess.run([sys.executable, "-m", "dpo_eval", "generate", "--base", str(stories260k),
                             "--adapter", str(adapters["trained"]), "--dataset", str(orca_jsonl), "--limit", "4",
                             "--quantization", "4bit", "--max-new-tokens", "8", "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["models"] == ["base", "tuned"] and summary["answers"] == 8
    answers = pl.read_parquet(out)
    assert answers.columns == ["pair_id", "model", "answer", "n_prompt_tokens", "n_new_tokens", "finish_reason",
                               "truncated"]
    bad = subprocess.run([sys.executable, "-m", "dpo_eval", "generate", "--base", str(stories260k),
                          "--dataset", str(orca_jsonl), "--quantization", "3bit", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--quantization" in bad.stderr and "Traceback" not in bad.stderr
