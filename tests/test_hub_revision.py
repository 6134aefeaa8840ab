"""A hub model is loaded at the commit its identity resolved, not at the branch as it is at load time.

No network: a Hugging Face hub cache laid out in tmp (models--org--name/snapshots/<commit>, refs/main) with
stories260k's real files and a LoRA adapter built here; each repo has two commits with different weights, and
refs/main moves from the first to the second between identification and load.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dpo_eval.config import ModelSpec
from dpo_eval.generation.models import load_model
from dpo_eval.identity import DigestStore, model_identity
from tests.builders import make_adapter

OLD, NEW = "1" * 40, "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache in tmp with org/tiny (the base) and org/lora (an adapter), refs/main at OLD."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DPO_EVAL_CACHE", str(tmp_path / "dpo-eval"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read by huggingface_hub at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache, repo: str, commit: str):
    folder = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


def _point_main(cache, repo: str, commit: str) -> None:
    refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(commit)


def _base_commits(cache, stories260k) -> None:
    """org/tiny at OLD: stories260k; at NEW: its weights scaled and a shorter tokenizer model_max_length."""
    for commit in (OLD, NEW):
        folder = _snapshot(cache, "org/tiny", commit)
        for file in stories260k.iterdir():
            shutil.copyfile(file, folder / file.name)
    new = cache / "models--org--tiny" / "snapshots" / NEW
    weights = {k: v * 1.5 for k, v in load_file(new / "model.safetensors").items()}
    save_file(weights, new / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((new / "tokenizer_config.json").read_text())
    (new / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 64}))
    _point_main(cache, "org/tiny", OLD)


def _adapter_commits(cache, stories260k, tmp_path) -> None:
    """org/lora at OLD and NEW: two random LoRA adapters of stories260k (recorded as trained on org/tiny)."""
    for commit, seed in ((OLD, 1), (NEW, 2)):
        built = make_adapter(stories260k, tmp_path / f"lora-{seed}", zero=False, seed=seed)
        config = json.loads((built / "adapter_config.json").read_text())
        (built / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/tiny"}))
        shutil.copytree(built, _snapshot(cache, "org/lora", commit), dirs_exist_ok=True)
    _point_main(cache, "org/lora", OLD)


def _base_weights(model) -> dict[str, torch.Tensor]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {k: v for k, v in base.state_dict().items() if "lora_" not in k}


def test_the_base_and_tokenizer_load_at_the_identified_commit_after_the_branch_moved(hub, stories260k, tmp_path):
    _base_commits(hub, stories260k)
    spec = ModelSpec(base="org/tiny", quantization="none", compute_dtype="float32")
    identity = model_identity(spec, DigestStore(tmp_path / "digests"))
    assert identity.base["commit"] == OLD
    _point_main(hub, "org/tiny", NEW)  # the branch moves after identification, before loading
    loaded = load_model(spec, identity)
    old = load_file(hub / "models--org--tiny" / "snapshots" / OLD / "model.safetensors")
    weights = _base_weights(loaded.model)
    assert torch.equal(weights["model.embed_tokens.weight"], old["model.embed_tokens.weight"])
    assert all(torch.equal(weights[k], v) for k, v in old.items() if k in weights)
    assert loaded.tokenizer.model_max_length != 64  # OLD's tokenizer, not NEW's
    assert loaded.identity == identity
    # identified afresh, the same spec is the new commit, loaded as such
    fresh = load_model(spec)
    assert fresh.identity.base["commit"] == NEW and fresh.tokenizer.model_max_length == 64
    assert torch.equal(_base_weights(fresh.model)["model.embed_tokens.weight"], old["model.embed_tokens.weight"] * 1.5)


def test_a_hub_adapter_loads_at_the_identified_commit_after_the_branch_moved(hub, stories260k, tmp_path):
    _base_commits(hub, stories260k)
    _adapter_commits(hub, stories260k, tmp_path)
    spec = ModelSpec(base="org/tiny", adapter="org/lora", quantization="none", compute_dtype="float32")
    identity = model_identity(spec, DigestStore(tmp_path / "digests"))
    assert identity.adapter == {"hub": "org/lora", "revision": None, "commit": OLD}
    _point_main(hub, "org/lora", NEW)
    loaded = load_model(spec, identity)
    old = load_file(hub / "models--org--lora" / "snapshots" / OLD / "adapter_model.safetensors")
    new = load_file(hub / "models--org--lora" / "snapshots" / NEW / "adapter_model.safetensors")
    loaded_lora = {k.replace(".default", ""): v for k, v in loaded.model.state_dict().items() if "lora_B" in k}
    assert set(loaded_lora) == {k for k in old if "lora_B" in k}
    assert all(torch.equal(loaded_lora[k], old[k]) for k in loaded_lora)
    assert not any(torch.equal(loaded_lora[k], new[k]) for k in loaded_lora)
