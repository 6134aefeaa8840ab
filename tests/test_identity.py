"""The complete model identity: every input that changes outputs changes the key; nothing else does."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from dpo_eval import identity as ident
from dpo_eval.config import ModelSpec
from dpo_eval.identity import DigestStore, folder_files, hub_revision, model_identity
from tests.builders import make_adapter


@pytest.fixture(scope="module")
def adapter(stories260k, tmp_path_factory):
    return make_adapter(stories260k, tmp_path_factory.mktemp("identity") / "adapter", zero=False, seed=5)


@pytest.fixture
def store(tmp_path):
    return DigestStore(tmp_path / "digests")


def _edit_json(path, **update):
    data = json.loads(path.read_text())
    data.update(update)
    path.write_text(json.dumps(data))


def _change_tokenizer_json(folder):
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(data))


BASE_CHANGES = {
    "tokenizer_config.json (a chat template)": lambda f: _edit_json(
        f / "tokenizer_config.json", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"),
    "chat_template.jinja": lambda f: (f / "chat_template.jinja").write_text("{{ messages[0]['content'] }}"),
    "tokenizer.json": _change_tokenizer_json,
    "config.json (context length)": lambda f: _edit_json(f / "config.json", max_position_embeddings=128),
    "generation_config.json (EOS ids)": lambda f: _edit_json(f / "generation_config.json", eos_token_id=[2, 3]),
    "model.safetensors": lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\1"),
}


@pytest.mark.parametrize("change", list(BASE_CHANGES))
def test_each_base_input_changed_alone_changes_both_keys(stories260k, adapter, tmp_path, store, change):
    copy = shutil.copytree(stories260k, tmp_path / "base")
    before = model_identity(ModelSpec(base=str(copy), adapter=str(adapter)), store)
    BASE_CHANGES[change](copy)
    after = model_identity(ModelSpec(base=str(copy), adapter=str(adapter)), store)
    assert after.base_key != before.base_key and after.tuned_key != before.tuned_key


def test_an_unchanged_copy_at_another_path_has_the_same_identity(stories260k, adapter, tmp_path, store):
    copy = shutil.copytree(stories260k, tmp_path / "elsewhere" / "copy")
    adapter_copy = shutil.copytree(adapter, tmp_path / "adapter-copy")
    a = model_identity(ModelSpec(base=str(stories260k), adapter=str(adapter)), store)
    b = model_identity(ModelSpec(base=str(copy), adapter=str(adapter_copy)), store)
    assert a == b
    (copy / "README.md").write_text("a changed model card changes no output")
    assert model_identity(ModelSpec(base=str(copy), adapter=str(adapter_copy)), store) == a


@pytest.mark.parametrize("field,value", [("quantization", "none"), ("compute_dtype", "float32"),
                                         ("prompt_template", "Q: {{ prompt }}\nA:")])
def test_loading_settings_change_the_key(stories260k, adapter, store, field, value):
    spec = ModelSpec(base=str(stories260k), adapter=str(adapter))
    assert model_identity(spec.model_copy(update={field: value}), store).tuned_key != model_identity(spec, store).tuned_key


def test_library_versions_change_the_key(stories260k, store, monkeypatch):
    spec = ModelSpec(base=str(stories260k))
    before = model_identity(spec, store)
    assert set(before.versions) == {"torch", "transformers", "peft", "bitsandbytes", "accelerate"}
    real = ident.library_versions
    monkeypatch.setattr(ident, "library_versions", lambda: real() | {"transformers": "0.0.1"})
    assert model_identity(spec, store).base_key != before.base_key


def test_trainer_state_files_do_not_change_the_adapter_key(stories260k, adapter, tmp_path, store):
    copy = shutil.copytree(adapter, tmp_path / "checkpoint-20")
    spec = ModelSpec(base=str(stories260k), adapter=str(copy))
    before = model_identity(spec, store)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "training_args.bin",
                 "trainer_state.json", "dpo_eval_training.json"):
        (copy / name).write_bytes(b"trainer state of another run")
    assert model_identity(spec, store) == before
    _edit_json(copy / "adapter_config.json", lora_alpha=3)  # the adapter's own config does change outputs
    changed = model_identity(spec, store)
    assert changed.tuned_key != before.tuned_key and changed.base_key == before.base_key


def test_large_digests_are_persisted_and_rehashed_when_a_file_changes(tmp_path, monkeypatch):
    import dpo_eval.identity as identity

    monkeypatch.setattr(identity, "SMALL_FILE", 100)  # files of 100 bytes and more count as large here
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "big.bin").write_bytes(b"x" * 1000)
    (folder / "small.json").write_text("{}")
    first = DigestStore(tmp_path / "digests")
    identity.folder_files(folder, first)
    assert first.hashed == 2
    again = DigestStore(tmp_path / "digests")  # a new process, the same cache folder
    identity.folder_files(folder, again)
    assert again.hashed == 1  # the large file from the table, the small one read again
    (folder / "big.bin").write_bytes(b"y" * 1001)
    third = DigestStore(tmp_path / "digests")
    assert identity.folder_files(folder, third)["big.bin"] == hashlib.sha256(b"y" * 1001).hexdigest()
    assert third.hashed == 2  # the changed large file is read again


def test_an_adapter_rewritten_in_one_mtime_tick_with_the_same_size_gets_a_new_digest(tmp_path):
    import os

    folder = tmp_path / "adapter"
    folder.mkdir()
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"a" * 4096)
    stat = weights.stat()
    store = DigestStore(tmp_path / "digests")
    before = folder_files(folder, store)
    weights.write_bytes(b"b" * 4096)  # same size, and the same mtime as a coarse file system would keep
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and weights.stat().st_size == stat.st_size
    assert folder_files(folder, store)["adapter_model.safetensors"] != before["adapter_model.safetensors"]


def test_nested_files_are_hashed_but_a_trainers_checkpoints_are_not(tmp_path):
    folder = tmp_path / "model"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 1}')
    store = DigestStore(tmp_path / "digests")
    before = folder_files(folder, store)
    assert set(before) == {"config.json", "tokenizer/vocab.json"}
    (folder / "tokenizer" / "vocab.json").write_text('{"a": 2}')
    assert folder_files(folder, store)["tokenizer/vocab.json"] != before["tokenizer/vocab.json"]
    (folder / "checkpoint-20").mkdir()
    (folder / "checkpoint-20" / "adapter_model.safetensors").write_bytes(b"new checkpoint")
    assert set(folder_files(folder, store)) == {"config.json", "tokenizer/vocab.json"}


def test_hub_revision_is_a_commit_from_the_local_hub_cache_or_unpinned(tmp_path, monkeypatch):
    """Offline, a hub id resolves through huggingface_hub's own cache layout (refs/<branch> -> snapshot)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--model"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    assert hub_revision("org/model", None) == commits[0]
    (repo / "refs" / "main").write_text(commits[1])  # the branch moved: a new commit, so a new key
    assert hub_revision("org/model", "main") == commits[1]
    assert hub_revision("org/model", "c" * 40) == "c" * 40  # a pinned commit is taken as it is
    assert hub_revision("org/absent", None) == "unpinned"
    spec = ModelSpec(base="org/absent", quantization="none")
    assert model_identity(spec, DigestStore(tmp_path / "d")).unpinned == ["base org/absent"]


def test_a_pinned_identity_keeps_its_hub_commits_when_the_branch_moves(tmp_path, monkeypatch):
    """`commit` is what loading asks for; model_identity(pinned=...) (load_model's check after loading) keeps the
    loaded commit while a fresh identity follows the branch."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--model"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    store = DigestStore(tmp_path / "digests")
    spec = ModelSpec(base="org/model", quantization="none")
    identity = model_identity(spec, store)
    assert identity.commit("base") == commits[0] and identity.commit("adapter") is None
    (repo / "refs" / "main").write_text(commits[1])
    assert model_identity(spec, store).commit("base") == commits[1]
    assert model_identity(spec, store, pinned=identity) == identity
    assert model_identity(ModelSpec(base="org/absent"), store).commit("base") is None  # unpinned: no commit to ask
    assert hub_revision("org/model", None, repo_type="dataset") == "unpinned"  # data sets have their own repos


def test_an_adapter_is_read_whole_every_time_whatever_its_size(stories260k, tmp_path, monkeypatch):
    import os

    import dpo_eval.identity as identity

    monkeypatch.setattr(identity, "SMALL_FILE", 10)  # every file here counts as large: a base keeps the shortcut
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"a" * 4096)
    stat = weights.stat()
    spec = ModelSpec(base=str(stories260k), adapter=str(adapter))
    store = DigestStore(tmp_path / "digests")
    before = model_identity(spec, store).tuned_key
    weights.write_bytes(b"b" * 4096)  # a rewrite with the same size and mtime (a 7B LoRA is over 64 MB)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_identity(spec, store).tuned_key != before
