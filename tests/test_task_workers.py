"""Generation (and scoring) shards on two real `dpo-eval worker` processes (Prefect task workers) of the session's
real `prefect server`: both take shards, the answers equal a local run's, a rerun generates nothing, and a worker
SIGKILLed mid-shard loses only that shard (its lease lapses, the shard is submitted again, the other worker makes
it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import polars as pl
import pytest

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from tests.builders import make_adapter
from tests.prefect_server import api_json, context_thread, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
SHARDS = 6  # 12 pairs, 2 per shard: 12 generation task runs (base and tuned)


def start_worker(api: str, env: dict, results: Path, log: Path) -> subprocess.Popen:
    worker_env = dict(env, PREFECT_API_URL=api, PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results),
                      PYTHONPATH=str(ROOT), PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dpo_eval", "worker"], env=worker_env, cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def label(proc: subprocess.Popen) -> str:
    """The worker column value of a worker process (dpo_eval.stages.worker_label)."""
    return f"{socket.gethostname()}:{proc.pid}"


def connected_workers(api: str) -> set[str]:
    """Identifiers (host-pid) of the task workers subscribed to the server now."""
    return {w["identifier"] for w in httpx.post(f"{api}/task_workers/filter", json={}, timeout=10).json()}


def wait_connected(api: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    def ready():
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, f"worker exited:\n{log.read_text()[-3000:]}"
        return {p.pid for p in procs} <= {int(i.rsplit("-", 1)[1]) for i in connected_workers(api)}
    wait_for(ready, 180, "the task workers to subscribe")


def evaluate(config: EvalConfig, results: Path) -> dict:
    """The evaluate-checkpoint flow in this process (against the session server) with `results` as storage."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
        return evaluate_checkpoint(config)


def answers_of(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "answers.parquet").sort("pair_id", "model")


@pytest.fixture(scope="module")
def setting(stories260k, orca_jsonl, tmp_path_factory):
    """The evaluation, and its answers made locally: shard by shard in this process, as the local runner does."""
    from dpo_eval import stages
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.identity import model_identity

    root = tmp_path_factory.mktemp("task-workers")
    adapter = make_adapter(stories260k, root / "adapter", zero=False, seed=5)
    config = EvalConfig(dataset=DatasetSpec(source=str(orca_jsonl), limit=2 * SHARDS),
                        model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit"),
                        generation=GenerationSpec(max_new_tokens=12, batch_size=4),
                        scoring=ScoringSpec(cache_dir=root / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=0, permutations=0), rewards=False,
                        shard_size=2, generation_runner="task-workers")
    pairs, _ = stages.apply_training_split(read_pairs(config.dataset)[0], str(adapter))
    identity = model_identity(config.model)
    local = pl.concat([stages.generate_shard(config.model, config.generation, shard, model, identity.key(model))[0]
                       for shard in stages.shard_pairs(pairs, config.shard_size) for model in ("base", "tuned")])
    stages.release_models()
    return root, config, pairs, local.sort("pair_id", "model")


@pytest.fixture
def two_workers(server, setting):
    api, env = server
    root = setting[0]
    logs = [root / "worker-1.log", root / "worker-2.log"]
    procs = [start_worker(api, env, root / "results-shared", log) for log in logs]
    try:
        wait_connected(api, procs, logs)
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def test_shards_spread_over_two_workers_and_equal_a_local_run(on_server, setting, two_workers):
    from dpo_eval import stages

    root, config, pairs, local = setting
    spread = config.model_copy(update={"scoring_runner": "task-workers", "out": root / "spread"})
    summary = evaluate(spread, root / "results-shared")
    assert summary["cache"]["generate"] == {"hits": 0, "misses": 2 * SHARDS}
    answers = answers_of(root / "spread")
    assert answers.drop("worker").equals(local.drop("worker"))  # what the local runner makes, shard by shard
    by_worker = answers.group_by("worker").len()
    assert set(by_worker["worker"]) == {label(p) for p in two_workers}, f"not both workers made shards: {by_worker}"
    assert summary["workers"]["resubmitted"] == [] and summary["workers"]["runner"] == "task-workers"
    assert sum(summary["workers"]["answers"].values()) == answers.height

    # scoring ran on the workers (their score cache was empty), with the scores this process gives
    assert summary["cache"]["score"]["misses"] > 0
    texts = stages.texts_of(pairs, pl.read_parquet(root / "spread" / "answers.parquet"))  # the flow's order
    features = pl.read_parquet(root / "spread" / "features.parquet")
    expected = stages.features_table(texts, stages.score_frame(texts, config.scoring.model_copy(
        update={"cache": False}))[0])
    assert features.equals(expected)

    again = evaluate(spread.model_copy(update={"out": root / "again"}), root / "results-shared")
    assert again["cache"]["generate"] == {"hits": 2 * SHARDS, "misses": 0}  # nothing generated again
    assert answers_of(root / "again").equals(answers)  # worker column included: who made each shard


def leases(api: str) -> list[dict]:
    return httpx.post(f"{api}/variables/filter", json={"variables": {"name": {"like_": "dpo-eval-lease-%"}}},
                      timeout=10).json()


def test_a_worker_killed_mid_shard_loses_only_that_shard(on_server, server, setting):
    api, env = server
    root, config, _, local = setting
    results = root / "results-kill"  # nothing cached: every shard is generated in this test
    first = start_worker(api, env, results, root / "worker-a.log")
    second = None
    run = config.model_copy(update={"worker_lease_s": 4.0, "out": root / "killed"})
    outcome: dict = {}
    try:
        wait_connected(api, [first], [root / "worker-a.log"])
        flow = context_thread(lambda: outcome.update(summary=evaluate(run, results)))
        held = wait_for(lambda: next((v for v in leases(api) if v["value"]["worker"] == label(first)),
                                     None), 120, "worker A to hold a shard", interval=0.1)
        os.killpg(first.pid, signal.SIGKILL)  # a spot preemption: no goodbye
        first.wait(timeout=30)
        second = start_worker(api, env, results, root / "worker-b.log")
        flow.join(timeout=300)
        assert not flow.is_alive(), "the evaluation did not finish after worker A was lost"
    finally:
        for proc in (first, second):
            if proc is not None:
                stop(proc)
    summary = outcome["summary"]
    lost = held["name"].removeprefix("dpo-eval-lease-")
    assert [r["task_run"] for r in summary["workers"]["resubmitted"]] == [lost]  # that shard, and only it
    assert summary["workers"]["resubmitted"][0]["worker"] == label(first)
    state = httpx.get(f"{api}/task_runs/{lost}", timeout=10).json()["state"]
    assert state["type"] == "CRASHED" and "lost" in state["message"]
    answers = answers_of(root / "killed")
    assert answers.drop("worker").equals(local.drop("worker"))
    assert set(answers["worker"]) == {label(second)}  # A finished none; B made every shard, the lost one too
    assert summary["cache"]["generate"]["misses"] == 2 * SHARDS


def test_the_flow_reads_the_states_of_more_task_runs_than_one_api_page(on_server):
    """An evaluation of 160k pairs has thousands of shards: their states are read page by page (200 a page)."""
    from types import SimpleNamespace

    from dpo_eval.flows.task_workers import READ_PAGE, _states
    from prefect import get_client

    ids = [api_json("POST", f"{on_server}/task_runs/", json={"name": f"page-{i}", "task_key": "page-probe",
                                                             "dynamic_key": str(i)})["id"]
           for i in range(READ_PAGE + 5)]
    with get_client(sync_client=True) as client:
        states = _states(client, {i: SimpleNamespace(task_run_id=run) for i, run in enumerate(ids)})
    assert sorted(str(k) for k in states) == sorted(ids)
