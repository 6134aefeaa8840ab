"""Generation engines (hf 4-bit, dequantized, continuous batching) and the batch planner, on stories260k
with real bitsandbytes 4-bit layers and real peft adapters; no mocks."""

from __future__ import annotations

import pytest

from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.batch_plan import (
    ModelShape,
    halved,
    kv_bytes_per_token,
    model_shape,
    plan_batch_size,
    resolve_batch_size,
    sequence_bytes,
)
from tests.builders import make_adapter

TOKENS = 32  # greedy tokens per answer: long enough for small numeric differences to change a token
N_PAIRS = 8


@pytest.fixture(scope="module")
def pairs(orca_jsonl):
    return read_pairs(DatasetSpec(source=str(orca_jsonl), limit=N_PAIRS))[0]


@pytest.fixture(scope="module")
def adapter(stories260k, tmp_path_factory):
    return make_adapter(stories260k, tmp_path_factory.mktemp("engines") / "adapter", zero=False, seed=7,
                        b_std=0.05, targets=("q_proj", "v_proj", "down_proj"))


def _spec(stories260k, adapter, quantization="4bit"):
    return ModelSpec(base=str(stories260k), adapter=str(adapter), quantization=quantization, compute_dtype="float32")


def _answers(loaded, pairs, engine="hf", merge=False):
    from dpo_eval.generation.generate import generate_both

    frame = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=TOKENS, batch_size=8, engine=engine,
                                                        merge=merge))
    return {side: frame.filter(frame["model"] == side)["answer"].to_list() for side in ("tuned", "base")}


def _same(a, b) -> int:
    return sum(x == y for x, y in zip(a, b))


@pytest.fixture(scope="module")
def generated(stories260k, adapter, pairs):
    """Logits (tuned and base, on the chosen answers) and greedy answers of the 4-bit hf engine, the
    dequantized engine and the full-precision model; one load each."""
    from dpo_eval.generation.models import load_model
    from dpo_eval.studies.diagnostics import _batch, _logits

    out = {}
    for name, quantization, engine in (("hf", "4bit", "hf"), ("dequantized", "4bit", "dequantized"),
                                       ("full", "none", "hf")):
        loaded = load_model(_spec(stories260k, adapter, quantization), engine=engine)
        batch = _batch(loaded.tokenizer, pairs, loaded.context_length)
        logits = {"tuned": _logits(loaded.model, batch)}
        with loaded.base_context():
            logits["base"] = _logits(loaded.model, batch)
        out[name] = {"logits": logits, "answers": _answers(loaded, pairs, engine), "batch": batch}
    return out


def test_dequantized_engine_agrees_with_nf4_far_more_than_full_precision(generated, record_property):
    from dpo_eval.studies.diagnostics import compare_logits

    nf4, batch = generated["hf"], generated["hf"]["batch"]
    for side in ("tuned", "base"):
        same = {name: _same(nf4["answers"][side], generated[name]["answers"][side]) for name in ("dequantized", "full")}
        diff = {name: compare_logits(nf4["logits"][side], generated[name]["logits"][side], batch)
                for name in ("dequantized", "full")}
        for name in same:
            record_property(f"{side} {name} vs nf4", {"greedy_identical": same[name]} | diff[name])
        print(f"{side}: greedy answers identical to nf4 of {N_PAIRS}: {same}; max |logit diff| "
              f"{ {k: round(v['max_abs_logit_diff'], 4) for k, v in diff.items()} }, top-1 agreement "
              f"{ {k: round(v['top1_agreement'], 4) for k, v in diff.items()} }")
        assert same["dequantized"] >= same["full"] + N_PAIRS // 4 and same["dequantized"] >= N_PAIRS // 2
        assert diff["dequantized"]["max_abs_logit_diff"] < diff["full"]["max_abs_logit_diff"] / 3
        assert diff["dequantized"]["top1_agreement"] > diff["full"]["top1_agreement"]


def test_merged_into_dequantized_equals_unmerged(stories260k, adapter, pairs, generated):
    """Merged tuned logits within 1e-4 of the unmerged adapter's (float32); base weights restored exactly."""
    import torch

    from dpo_eval.generation.models import load_model
    from dpo_eval.studies.diagnostics import _logits, compare_logits

    reference, batch = generated["dequantized"], generated["dequantized"]["batch"]
    merged = load_model(_spec(stories260k, adapter), engine="dequantized", merge=True)
    with merged.tuned_context():
        tuned = _logits(merged.model, batch)
    assert merged.merge_switch.merged
    with merged.base_context():
        base = _logits(merged.model, batch)
    assert not merged.merge_switch.merged
    with merged.tuned_context():
        tuned_again = _logits(merged.model, batch)
    diff = compare_logits(reference["logits"]["tuned"], tuned, batch)["max_abs_logit_diff"]
    print(f"merged vs unmerged tuned: max |logit diff| {diff:.3g}")
    assert diff <= 1e-4  # merged: another order of the same arithmetic, the same function
    assert torch.equal(base, reference["logits"]["base"])  # base answers never see W + dW - dW
    assert torch.equal(tuned, tuned_again)
    assert (tuned - base).abs().max() > 1e-2  # the adapter does change the model
    answers = _answers(merged, pairs, "dequantized", merge=True)
    assert answers["base"] == reference["answers"]["base"]
    assert _same(answers["tuned"], reference["answers"]["tuned"]) >= N_PAIRS - 1


def test_continuous_batching_engine_with_adapter_and_disabled_adapter(stories260k, adapter, pairs):
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model

    loaded = load_model(_spec(stories260k, adapter), engine="continuous")
    few = pairs.head(4)  # continuous batching's scheduler thread is slow on the CPU: a few short answers
    spec = GenerationSpec(max_new_tokens=8, engine="continuous")
    continuous = generate_both(loaded, few, spec)
    loaded.engine = "dequantized"  # the same weights through generate(), the reference
    plain = generate_both(loaded, few, spec.model_copy(update={"engine": "dequantized", "batch_size": 4}))
    assert continuous["answer"].to_list() == plain["answer"].to_list()
    assert continuous["n_new_tokens"].to_list() == plain["n_new_tokens"].to_list()
    by_side = {side: continuous.filter(continuous["model"] == side)["answer"].to_list() for side in ("tuned", "base")}
    assert by_side["tuned"] != by_side["base"]  # the adapter is on, and off under disable_adapter()


def test_engine_is_part_of_the_generation_key_and_of_the_model_cache(stories260k, adapter, pairs):
    import bitsandbytes as bnb
    from dpo_eval.tasks.evaluation import _generation_key

    from dpo_eval import stages

    params = {"key": "k", "model": "tuned", "shard": pairs}
    keys = {engine: _generation_key(None, params | {"generation": GenerationSpec(engine=engine)})
            for engine in ("hf", "dequantized", "continuous")}
    keys["merged"] = _generation_key(None, params | {"generation": GenerationSpec(engine="dequantized", merge=True)})
    assert len(set(keys.values())) == 4
    spec = _spec(stories260k, adapter)
    try:
        four = stages.cached_model(spec, engine="hf")
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in four.model.modules())
        dequantized = stages.cached_model(spec, engine="dequantized")
        assert dequantized is not four and dequantized.engine == "dequantized"
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dequantized.model.modules())
        assert stages.cached_model(spec, engine="dequantized") is dequantized
        identity = stages.model_identity(spec)
        gen = GenerationSpec(max_new_tokens=4, engine="dequantized", batch_size=4)
        answers, _ = stages.generate_shard(spec, gen, pairs.head(2), "tuned", identity.tuned_key, halvings=3)
        assert answers.height == 2 and stages.cached_model(spec, engine="dequantized") is dequantized
    finally:
        stages.release_models()


def test_engine_settings_that_cannot_work_are_errors(stories260k, adapter):
    from pydantic import ValidationError

    from dpo_eval.generation.engines import check_engine

    with pytest.raises(ValidationError, match="merge needs the dequantized"):
        GenerationSpec(merge=True)
    with pytest.raises(ValidationError, match="decodes greedily only"):
        GenerationSpec(do_sample=True, engine="continuous")
    with pytest.raises(DpoEvalError, match="--engine dequantized needs --quantization 4bit"):
        check_engine(_spec(stories260k, adapter, "none"), "dequantized")
    with pytest.raises(DpoEvalError, match="8bit"):
        check_engine(_spec(stories260k, adapter, "8bit"), "continuous")


MISTRAL_7B = ModelShape(layers=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=32000,
                        dtype_bytes=2)


def test_kv_cache_bytes_of_a_mistral_7b_shape():
    from transformers import MistralConfig

    shape = model_shape(MistralConfig(), dtype_bytes=2)  # the defaults are Mistral-7B's
    assert shape == MISTRAL_7B
    assert kv_bytes_per_token(shape) == 32 * 8 * 128 * 2 * 2 == 131072


@pytest.mark.parametrize("longest,new", [(64, 16), (1024, 256), (4000, 512)])
def test_planned_batch_is_monotone_in_free_memory_and_within_the_budget(longest, new):
    per_sequence = sequence_bytes(MISTRAL_7B, longest, new)
    assert per_sequence > kv_bytes_per_token(MISTRAL_7B) * (longest + new)
    previous = 0
    for free in sorted([0, 10**6, per_sequence, 3 * per_sequence, 2**30, 10 * 2**30, 40 * 2**30, 80 * 2**30, 2**40]):
        batch = plan_batch_size(free, per_sequence)
        assert 1 <= batch <= 256 and batch >= previous
        assert batch == 1 or batch * per_sequence <= 0.8 * free
        previous = batch
    weights = 15 * 2**30
    assert plan_batch_size(80 * 2**30, per_sequence, weights_bytes=weights) <= plan_batch_size(80 * 2**30, per_sequence)
    assert [halved(40, n) for n in range(7)] == [40, 20, 10, 5, 2, 1, 1]


def test_batch_size_is_the_users_or_16_on_the_cpu(stories260k):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories260k)
    assert resolve_batch_size(model, [[1, 2, 3]], None, 8) == 16
    assert resolve_batch_size(model, [[1, 2, 3]], 5, 8) == 5


def test_cli_generate_with_the_dequantized_engine_merged(stories260k, adapter, orca_jsonl, tmp_path):
    import json

    import polars as pl
    from typer.testing import CliRunner

    from dpo_eval.cli.main import app

    out = tmp_path / "answers.parquet"
    result = CliRunner().invoke(app, ["generate", "--base", str(stories260k), "--adapter", str(adapter), "--dataset",
                                      str(orca_jsonl), "--limit", "2", "--max-new-tokens", "4", "--compute-dtype",
                                      "float32", "--engine", "dequantized", "--merge", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["engine"] == "dequantized" and summary["merge"] is True
    assert pl.read_parquet(out).height == 4
    wrong = CliRunner().invoke(app, ["generate", "--base", str(stories260k), "--dataset", str(orca_jsonl),
                                     "--quantization", "none", "--engine", "dequantized", "--out", str(out)])
    assert wrong.exit_code != 0 and "--engine dequantized needs --quantization 4bit" in str(wrong.exception)
