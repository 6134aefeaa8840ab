"""Shared fixtures. Tests that read ../shared skip where it is absent, unless
DPO_EVAL_REQUIRE_SHARED=1 (set by CI), which turns that skip into a failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.prefect_server import on_server, server  # noqa: F401 - session fixtures: one real Prefect server

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DPO_EVAL_SHARED", ROOT.parent / "shared"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_path(relative: str) -> Path:
    """A path under ../shared; skip (or fail under CI) when it is absent."""
    path = SHARED / relative
    if not path.exists():
        message = f"{path} is absent: ../shared holds the real data and model these tests need"
        if os.environ.get("DPO_EVAL_REQUIRE_SHARED") == "1":
            pytest.fail(message + " (DPO_EVAL_REQUIRE_SHARED=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def orca_jsonl() -> Path:
    return shared_path("data/orca_dpo_pairs/validation.jsonl")


@pytest.fixture(scope="session")
def orca_openai_jsonl() -> Path:
    return shared_path("data/orca_dpo_pairs/validation_openai_format.jsonl")


@pytest.fixture(scope="session")
def hh_rlhf_gz() -> Path:
    return shared_path("data/hh_rlhf/harmless-base-test.jsonl.gz")


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_path("models/stories260k")


@pytest.fixture(scope="module")
def harness():
    """A real Prefect API on a temporary SQLite database, one per test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def scripted_judge():
    """A scripted OpenAI-compatible judge on 127.0.0.1 (tests/scripted_judge.py): the longer answer wins, equal
    lengths tie, so every verdict is valid and known. {"url", "model", "server"}."""
    from tests.scripted_judge import ScriptedJudge, longer_rule

    with ScriptedJudge(longer_rule()) as judge:
        yield {"url": judge.url, "model": judge.model, "server": judge}
