"""The evaluation flow under a real Prefect engine and server (prefect_test_harness)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from dpo_eval.config import DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from tests.builders import make_adapter

RUN_FILES = ("config.json", "pairs.parquet", "answers.parquet", "features.parquet", "stats.parquet", "stats.csv",
             "summary.json", "report.html")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    from tests.conftest import shared_path

    stories = shared_path("models/stories260k")
    root = tmp_path_factory.mktemp("flow-adapters")
    return {"a": make_adapter(stories, root / "a", zero=False, seed=1),
            "b": make_adapter(stories, root / "b", zero=False, seed=2)}


@pytest.fixture
def storage(tmp_path):
    """Fresh Prefect result storage and score cache for one test."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "results")}):
        yield tmp_path


def n_shards(orca, limit: int, shard_size: int) -> int:
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.stages import shard_pairs

    return len(shard_pairs(read_pairs(DatasetSpec(source=str(orca), limit=limit))[0], shard_size))


def config(orca, stories, adapter, out, cache, **generation) -> EvalConfig:
    return EvalConfig(dataset=DatasetSpec(source=str(orca), limit=24),
                      model=ModelSpec(base=str(stories), adapter=str(adapter), quantization="4bit"),
                      generation=GenerationSpec(max_new_tokens=generation.get("max_new_tokens", 12), batch_size=8),
                      scoring=ScoringSpec(cache_dir=cache, n_process=1), out=out, shard_size=8)


def test_flow_writes_the_run_directory_and_artifacts(harness, storage, adapters, orca_jsonl, stories260k):
    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    out = storage / "run"
    summary = evaluate_checkpoint(config(orca_jsonl, stories260k, adapters["a"], out, storage / "scores"))
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert len(list((out / "plots").glob("*.png"))) >= 4
    answers = pl.read_parquet(out / "answers.parquet")
    assert answers.height == 48 and set(answers["model"]) == {"base", "tuned"}
    features = pl.read_parquet(out / "features.parquet")
    assert features.height == 96 and set(features["role"]) == {"chosen", "rejected", "base", "tuned"}
    saved = json.loads((out / "config.json").read_text())
    assert saved["fingerprint"] and saved["base_fingerprint"] and saved["repairs"]
    assert saved["versions"]["prefect"] and saved["config"]["model"]["adapter"] == str(adapters["a"])
    assert summary["cache"]["generate"] == {"hits": 0, "misses": 2 * n_shards(orca_jsonl, 24, 8)}
    assert saved["model_identity"]["tuned_key"] == saved["fingerprint"]
    # one object per split and nothing else; beta beside it
    assert summary["implicit_reward"] and all(set(v) >= {"accuracy", "margin_mean", "n"}
                                              for v in summary["implicit_reward"].values())
    assert set(summary["implicit_reward"]) <= {"train", "valid"} and summary["implicit_reward_beta"] == 0.1
    assert set(saved["model_identity"]["base"]["files"]) >= {"tokenizer.json", "config.json", "model.safetensors"}
    with get_client(sync_client=True) as client:
        found = {key: client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                 for key in ("dpo-eval-summary", "dpo-eval-stats", "dpo-eval-generation", "dpo-eval-scoring")}
    assert found["dpo-eval-summary"][0].type == "markdown"
    assert "sign agreement" in found["dpo-eval-summary"][0].data.lower()
    assert found["dpo-eval-stats"][0].type == "table" and "norm_mean_delta" in str(found["dpo-eval-stats"][0].data)
    # progress people can see in the UI: one progress artifact per long stage, at 100% once it is done
    (generation,), (scoring,) = found["dpo-eval-generation"], found["dpo-eval-scoring"]
    assert generation.type == scoring.type == "progress" and float(generation.data) == float(scoring.data) == 100.0
    assert generation.description == "generation: 48 of 48 answers done"
    assert scoring.description == "scoring: 96 of 96 texts done"


def test_caching_consequences(harness, storage, adapters, orca_jsonl, stories260k):
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    cache = storage / "scores"
    first = evaluate_checkpoint(config(orca_jsonl, stories260k, adapters["a"], storage / "r1", cache))
    assert first["cache"]["generate"]["hits"] == 0 and first["cache"]["score"]["hits"] == 0
    # a second identical run: no generation, no scoring
    again = evaluate_checkpoint(config(orca_jsonl, stories260k, adapters["a"], storage / "r2", cache))
    tasks = 2 * n_shards(orca_jsonl, 24, 8)
    assert again["cache"]["generate"] == {"hits": tasks, "misses": 0}
    assert again["cache"]["score"]["misses"] == 0
    for name in ("answers.parquet", "stats.parquet"):
        assert pl.read_parquet(storage / "r1" / name).equals(pl.read_parquet(storage / "r2" / name))
    # a new adapter on the same base and data: base answers and chosen/rejected features are reused
    other = evaluate_checkpoint(config(orca_jsonl, stories260k, adapters["b"], storage / "r3", cache))
    assert other["cache"]["generate"] == {"hits": tasks // 2, "misses": tasks // 2}
    tuned_texts = set(pl.read_parquet(storage / "r3" / "answers.parquet").filter(pl.col("model") == "tuned")["answer"])
    pairs = pl.read_parquet(storage / "r1" / "pairs.parquet")
    old_texts = set(pl.read_parquet(storage / "r1" / "answers.parquet")["answer"]) | set(pairs["chosen"]) | set(
        pairs["rejected"])
    assert other["cache"]["score"]["misses"] == len(tuned_texts - old_texts)
    # a changed generation setting invalidates generation for both models, and nothing else
    longer = evaluate_checkpoint(config(orca_jsonl, stories260k, adapters["a"], storage / "r4", cache, max_new_tokens=16))
    assert longer["cache"]["generate"] == {"hits": 0, "misses": tasks}
    answers = pl.read_parquet(storage / "r4" / "answers.parquet")
    assert longer["cache"]["score"]["misses"] <= answers["answer"].n_unique()
    assert longer["cache"]["score"]["hits"] >= 48 - 1  # chosen and rejected (one text repeats)


def test_sigkill_mid_run_resumes_from_finished_shards(tmp_path, adapters, orca_jsonl, stories260k):
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "dpo_eval", "evaluate", "--base", str(stories260k), "--adapter",
               str(adapters["a"]), "--dataset", str(orca_jsonl), "--limit", "20", "--shard-size", "2",
               "--max-new-tokens", "16", "--bootstrap", "100", "--cache-dir", str(tmp_path / "scores")]
    killed = subprocess.Popen(command + ["--out", str(tmp_path / "killed")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finished = 0
    deadline = time.time() + 240
    for line in killed.stdout:
        if "generate-answers" in line and "Completed" in line:
            finished += 1
            if finished == 3:
                os.killpg(killed.pid, signal.SIGKILL)  # the spot instance vanishes, server and all
                break
        assert time.time() < deadline, "no generation shard finished in time"
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = subprocess.run(command + ["--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    cache = json.loads((tmp_path / "killed" / "summary.json").read_text())["cache"]
    assert cache["generate"]["hits"] >= 3
    assert cache["generate"]["hits"] + cache["generate"]["misses"] == 2 * n_shards(orca_jsonl, 20, 2)
    # an uninterrupted run in a fresh environment gives the same answers and statistics
    fresh_env = dict(env, PREFECT_HOME=str(tmp_path / "prefect-fresh"))
    clean = subprocess.run(command[:-2] + ["--cache-dir", str(tmp_path / "scores-fresh"), "--out",
                                           str(tmp_path / "clean")], env=fresh_env, capture_output=True, text=True,
                           timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed_answers = pl.read_parquet(tmp_path / "killed" / "answers.parquet")
    assert killed_answers["worker"].n_unique() == 2  # shards of the killed process and of the one that resumed
    assert killed_answers.drop("worker").equals(pl.read_parquet(tmp_path / "clean" / "answers.parquet").drop("worker"))
    assert pl.read_parquet(tmp_path / "killed" / "stats.parquet").equals(pl.read_parquet(tmp_path / "clean" / "stats.parquet"))


def test_dask_runner_gives_the_same_features(harness, storage, adapters, orca_jsonl, stories260k):
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    base = config(orca_jsonl, stories260k, adapters["a"], storage / "local", storage / "scores-local")
    evaluate_checkpoint(base)
    dask = base.model_copy(update={"out": storage / "dask", "scoring_runner": "dask",
                                   "scoring": ScoringSpec(cache_dir=storage / "scores-dask", n_process=2)})
    summary = evaluate_checkpoint(dask)
    assert summary["cache"]["score"]["hits"] == 0  # really scored again, on the Dask workers
    local = pl.read_parquet(storage / "local" / "features.parquet")
    assert local.equals(pl.read_parquet(storage / "dask" / "features.parquet"))


def test_retry_condition_and_batch_halving():
    import torch
    from dpo_eval.tasks.evaluation import _is_oom, batch_for_attempt
    from prefect.states import Completed, Failed

    from dpo_eval.errors import is_out_of_memory

    oom = Failed(data=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_oom(None, None, oom)
    assert _is_oom(None, None, Failed(data=ConnectionError("connection reset")))  # retried, but not halved:
    assert not is_out_of_memory(ConnectionError("out of memory on the proxy"))  # the type decides, not the text
    assert not is_out_of_memory(RuntimeError("CUDA out of memory"))
    assert is_out_of_memory(torch.AcceleratorError("CUDA error: out of memory")) if hasattr(torch, "AcceleratorError") \
        else True
    assert not _is_oom(None, None, Failed(data=ValueError("bad prompt")))
    assert not _is_oom(None, None, Completed(data=1))
    assert [batch_for_attempt(16, n) for n in (0, 1, 2, 5)] == [16, 8, 4, 1]


def small(orca, base, adapter, out, cache, **generation) -> EvalConfig:
    """A fast evaluation: 8 pairs, one shard, no rewards, few resamples."""
    return EvalConfig(dataset=DatasetSpec(source=str(orca), limit=8),
                      model=ModelSpec(base=str(base), adapter=str(adapter), quantization="none",
                                      compute_dtype="float32"),
                      generation=GenerationSpec(**({"max_new_tokens": 6, "batch_size": 8} | generation)),
                      scoring=ScoringSpec(cache_dir=cache, n_process=1), out=out, shard_size=8, rewards=False,
                      analysis={"bootstrap": 50, "permutations": 50})


def test_generation_cache_follows_the_model_identity(harness, storage, orca_jsonl, stories260k):
    """A copy at another path hits; a changed generation config or chat template misses; an adapter
    rewritten at the same path misses for tuned only and generates with the new weights."""
    import shutil

    from dpo_eval.flows.evaluate import evaluate_checkpoint

    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model

    cache = storage / "scores"
    first, second = shutil.copytree(stories260k, storage / "m1"), shutil.copytree(stories260k, storage / "m2")
    latest = make_adapter(stories260k, storage / "latest", zero=False, seed=3)
    hit = {"hits": 2, "misses": 0}
    assert evaluate_checkpoint(small(orca_jsonl, first, latest, storage / "r1", cache))["cache"]["generate"] == \
        {"hits": 0, "misses": 2}
    assert evaluate_checkpoint(small(orca_jsonl, second, latest, storage / "r2", cache))["cache"]["generate"] == hit
    generation = json.loads((second / "generation_config.json").read_text()) | {"eos_token_id": [2, 13]}
    (second / "generation_config.json").write_text(json.dumps(generation))
    assert evaluate_checkpoint(small(orca_jsonl, second, latest, storage / "r3", cache))["cache"]["generate"] == \
        {"hits": 0, "misses": 2}
    tokenizer = json.loads((first / "tokenizer_config.json").read_text())
    tokenizer["chat_template"] = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    (first / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    assert evaluate_checkpoint(small(orca_jsonl, first, latest, storage / "r4", cache))["cache"]["generate"] == \
        {"hits": 0, "misses": 2}
    shutil.rmtree(latest)
    make_adapter(stories260k, latest, zero=False, seed=4)  # /checkpoints/latest, rewritten in place
    rewritten = small(orca_jsonl, first, latest, storage / "r5", cache)
    assert evaluate_checkpoint(rewritten)["cache"]["generate"] == {"hits": 1, "misses": 1}
    answers = pl.read_parquet(storage / "r5" / "answers.parquet").filter(pl.col("model") == "tuned")
    pairs = pl.read_parquet(storage / "r5" / "pairs.parquet")
    fresh = generate_both(load_model(rewritten.model), pairs, rewritten.generation, models=("tuned",))
    assert answers.sort("pair_id")["answer"].equals(fresh.sort("pair_id")["answer"])


def test_only_out_of_memory_failures_halve_the_batch_and_nothing_is_left_behind(harness):
    """A real task with retries: out of memory halves (1), a lost connection retries with the same batch (still 1),
    out of memory again halves (2); the count is gone once the task run ends, done or failed for good."""
    import torch
    from dpo_eval.tasks.evaluation import OOM_FAILURES, oom_halvings
    from prefect import task

    seen: list[int] = []
    failures = [torch.OutOfMemoryError("CUDA out of memory"), ConnectionError("connection reset"),
                torch.OutOfMemoryError("CUDA out of memory")]

    @task(retries=3, retry_delay_seconds=0)
    def flaky() -> int:
        with oom_halvings() as halvings:
            seen.append(halvings)
            if len(seen) <= len(failures):
                raise failures[len(seen) - 1]
            return halvings

    assert flaky() == 2 and seen == [0, 1, 1, 2] and OOM_FAILURES == {}

    @task(retries=1, retry_delay_seconds=0)
    def hopeless() -> None:
        with oom_halvings():
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        hopeless()
    assert OOM_FAILURES == {}  # the last attempt's count is not kept for a retry that never comes
    with oom_halvings() as outside:  # outside a task run there is nothing to count
        assert outside == 0


def test_out_of_memory_retry_halves_the_batch_and_gives_the_same_answers(harness, storage, orca_jsonl,
                                                                         stories260k):
    """The first attempt's batch of 8 is over the token budget (a real torch.OutOfMemoryError before any
    generation); the retry runs batches of 4 and stores the same answers an unconstrained run gives."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    adapter = make_adapter(stories260k, storage / "adapter", zero=False, seed=6)
    budget = 5 * 512  # stories260k's context is 512: 8 x (longest prompt + 6 new) > 2560 >= 4 x 512
    constrained = small(orca_jsonl, stories260k, adapter, storage / "oom", storage / "scores", max_batch_tokens=budget)
    state = evaluate_checkpoint(constrained, return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    generation = [r for r in runs if r.name.startswith("generate-answers")]
    assert len(generation) == 2 and all(r.run_count == 2 and r.state.is_completed() for r in generation)
    answers = pl.read_parquet(storage / "oom" / "answers.parquet")
    assert 8 * (answers["n_prompt_tokens"].max() + 6) > budget  # the first attempt really was over budget
    plain = small(orca_jsonl, stories260k, adapter, storage / "plain", storage / "scores", batch_size=4)
    evaluate_checkpoint(plain)
    assert answers.equals(pl.read_parquet(storage / "plain" / "answers.parquet"))
