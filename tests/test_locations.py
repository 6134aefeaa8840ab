"""One rule for local paths and hub ids (models, adapters, data sets)."""

from __future__ import annotations

import pytest

from dpo_eval.locations import is_local_path


@pytest.mark.parametrize("name, local", [
    ("gpt2", False),                      # a hub id without a slash
    ("openai-community/gpt2", False),
    ("mistralai/Mistral-7B-Instruct-v0.2", False),
    ("./gpt2", True),
    ("../shared/models/stories260k", True),
    ("/models/llama", True),
    ("~/models/llama", True),
    ("runs/out/checkpoint-20", True),     # two slashes: no hub id has them
    ("my model", True),                   # a space: no hub id has one
])
def test_is_local_path(name, local):
    assert is_local_path(name) is local


def test_an_existing_folder_is_local_even_when_shaped_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert is_local_path("gpt2") is True
