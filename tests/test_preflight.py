"""Pre-checks that run before a Prefect run or a model load, on real files in tmp_path."""

from __future__ import annotations

import json
import shutil

import pytest

from dpo_eval.config import ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.preflight import check_model, check_run_dir, safetensors_shapes
from tests.builders import copy_model, make_adapter


@pytest.fixture(scope="module")
def adapter(stories260k, tmp_path_factory):
    return make_adapter(stories260k, tmp_path_factory.mktemp("preflight") / "adapter")


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_an_adapter_that_fits_its_base_passes(stories260k, adapter):
    assert set(safetensors_shapes(adapter / "adapter_model.safetensors")) >= {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"}
    check_model(ModelSpec(base=str(stories260k), adapter=str(adapter)), require_adapter=True)


def test_an_adapter_for_another_hidden_size_is_named(stories260k, adapter, tmp_path):
    base = copy_model(stories260k, tmp_path / "wider")
    _edit_json(base / "config.json", hidden_size=96)
    with pytest.raises(DpoEvalError, match="does not fit --base .*q_proj.lora_A.weight takes 64 inputs, "
                                           "the base's hidden size is 96"):
        check_model(ModelSpec(base=str(base), adapter=str(adapter)))


def test_an_adapter_for_another_vocabulary_is_named(stories260k, tmp_path):
    adapter = make_adapter(stories260k, tmp_path / "head", targets=("q_proj", "lm_head"))
    base = copy_model(stories260k, tmp_path / "bigger-vocab")
    _edit_json(base / "config.json", vocab_size=1024)
    with pytest.raises(DpoEvalError, match="lm_head.lora_B.weight gives 512 logits, the base's vocab_size is 1024"):
        check_model(ModelSpec(base=str(base), adapter=str(adapter)))


def test_a_malformed_adapter_config_is_named(stories260k, adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(DpoEvalError, match="adapter_config.json: malformed JSON \\(line 1"):
        check_model(ModelSpec(base=str(stories260k), adapter=str(broken)))
    (broken / "adapter_config.json").write_text('{"r": 4}')
    with pytest.raises(DpoEvalError, match="adapter_config.json: not a peft adapter config"):
        check_model(ModelSpec(base=str(stories260k), adapter=str(broken)))


def test_missing_folders_and_a_missing_adapter_are_named(stories260k, tmp_path):
    with pytest.raises(DpoEvalError, match="--adapter is required"):
        check_model(ModelSpec(base=str(stories260k)), require_adapter=True)
    with pytest.raises(DpoEvalError, match="--base ./no-such-model: no such model folder"):
        check_model(ModelSpec(base="./no-such-model"))
    with pytest.raises(DpoEvalError, match="no such adapter folder"):
        check_model(ModelSpec(base=str(stories260k), adapter=str(tmp_path / "none")))


def test_a_hub_id_without_a_slash_is_a_hub_id_not_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_model(ModelSpec(base="gpt2"))  # nothing local to check, and no network needed


def test_a_folder_of_runs_is_not_a_run_and_says_what_to_pass(tmp_path):
    run = tmp_path / "runs" / "checkpoint-20"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"significant": {"tuned_vs_base": {"valid": 3}}}))
    (run / "config.json").write_text(json.dumps({"config": {"model": {"adapter": "ckpt/checkpoint-20"}}}))
    check_run_dir(run)
    with pytest.raises(DpoEvalError, match="not a dpo-eval run directory .*pass those folders"):
        check_run_dir(tmp_path / "runs")
