"""Every cache key records the version of dpo-eval's own code that made the value: bumping a stage's CODE_VERSION
(as a fix to prompt rendering, the fast scoring path or the judge prompt must) makes its cached values miss."""

from __future__ import annotations

import polars as pl
import pytest

from dpo_eval.config import GenerationSpec, JudgeSpec, ScoringSpec


def _generation_key() -> str:
    from dpo_eval.tasks.evaluation import _generation_key

    shard = pl.DataFrame({"pair_id": ["p0"], "system": [""], "messages": ['[{"role": "user", "content": "hi"}]']})
    return _generation_key(None, {"key": "k", "generation": GenerationSpec(), "model": "tuned", "shard": shard})


def _rewards_key() -> str:
    from dpo_eval.tasks.evaluation import _rewards_key

    pairs = pl.DataFrame({"pair_id": ["p0"], "split": ["valid"]})
    return _rewards_key(None, {"key": "k", "beta": 0.1, "max_length": None, "pairs": pairs})


def _judge_id() -> str:
    from dpo_eval.judges.api import judge_id, judge_identity
    from dpo_eval.judges.prompt import load_template

    return judge_id(judge_identity(JudgeSpec(model="m", base_url="http://127.0.0.1:8000/v1"), load_template()))


def _scoring_fingerprint() -> str:
    from dpo_eval.scoring.scorer import fingerprint

    return fingerprint(ScoringSpec())


def _forgetting_key() -> str:
    from dpo_eval.config import ForgettingSpec
    from dpo_eval.forgetting.harness import BenchmarkTask, cache_key

    return cache_key("model", BenchmarkTask("t", "t", None, "config-sha"), ForgettingSpec(tasks=("t",)))


def _served_identity() -> str:
    from dpo_eval.config import ServerSpec
    from dpo_eval.generation.openai_engine import served_identity
    from dpo_eval.jsonsafe import json_key

    server = ServerSpec(base_url="http://127.0.0.1:8000/v1", served_base="base", served_tuned="tuned")
    return json_key(served_identity(server, GenerationSpec(engine="openai", server=server), "tuned"))


@pytest.mark.parametrize("module, key", [
    ("dpo_eval.generation.generate", _generation_key),
    ("dpo_eval.generation.logprobs", _rewards_key),
    ("dpo_eval.judges.prompt", _judge_id),
    ("dpo_eval.scoring.scorer", _scoring_fingerprint),
    ("dpo_eval.forgetting.harness", _forgetting_key),
    ("dpo_eval.generation.openai_engine", _served_identity),
])
def test_bumping_a_code_version_changes_the_cache_key(module, key, monkeypatch):
    import importlib

    before = key()
    assert key() == before  # the key is stable while nothing changes
    target = importlib.import_module(module)
    monkeypatch.setattr(target, "CODE_VERSION", target.CODE_VERSION + "-bumped")
    if module == "dpo_eval.judges.prompt":  # imported by name into the judge modules
        import dpo_eval.judges.api as api

        monkeypatch.setattr(api, "CODE_VERSION", target.CODE_VERSION)
    assert key() != before
