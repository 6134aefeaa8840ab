"""The checkpoint watcher evaluates each complete checkpoint exactly once, under a real Prefect API.

Checkpoints are real LoRA adapters of stories260k with the training metadata the trainer's save callback
writes (dpo_eval/training/dpo.py); no training run, so the evaluations stay small."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from prefect import flow

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.data.demo import write_demo_dataset
from dpo_eval.training.dpo import METADATA
from tests.builders import make_adapter


def make_checkpoint(stories: Path, folder: Path, data: Path, step: int, seed: int, metadata: bool = True) -> Path:
    """A trl-style checkpoint-N folder: a LoRA adapter and, unless `metadata` is False, dpo-eval's training
    metadata with the train/valid pair ids of `data` (as the trainer's save callback writes it)."""
    from dpo_eval.data.pairs import read_pairs

    make_adapter(stories, folder, zero=False, seed=seed)
    if metadata:
        pairs, _ = read_pairs(DatasetSpec(source=str(data)))
        write_metadata(folder, pairs, step)
    return folder


def write_metadata(folder: Path, pairs: pl.DataFrame, step: int) -> None:
    ids = {split: pairs.filter(pl.col("split") == split)["pair_id"].to_list() for split in ("train", "valid")}
    (folder / METADATA).write_text(json.dumps({"step": step, "beta": 0.1, "loss_type": "sigmoid",
                                               "train_pair_ids": ids["train"], "valid_pair_ids": ids["valid"]}))


def small_config(data: Path, stories: Path, cache: Path) -> EvalConfig:
    return EvalConfig(dataset=DatasetSpec(source=str(data)), model=ModelSpec(base=str(stories), adapter="unset"),
                      generation=GenerationSpec(max_new_tokens=8, batch_size=32),
                      scoring=ScoringSpec(cache_dir=cache, n_process=1),
                      analysis=AnalysisSpec(bootstrap=0, permutations=0), rewards=False, out=cache.parent / "unused")


@pytest.fixture(scope="module")
def world(harness, stories260k, tmp_path_factory):
    """Result storage in the test's folder, a 16-pair demo data set, and a shared score cache."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    root = tmp_path_factory.mktemp("watch")
    data = write_demo_dataset(root / "pairs.jsonl", n=16)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(root / "results")}):
        yield {"root": root, "data": data, "config": small_config(data, stories260k, root / "scores")}


def state_of(out_root: Path) -> dict:
    return json.loads((out_root / "evaluated.json").read_text())


def test_same_name_in_two_training_runs_gives_two_runs_each_evaluated_once(world, stories260k, tmp_path):
    from dpo_eval.flows.watch import watch_checkpoints

    a = make_checkpoint(stories260k, tmp_path / "ckpt" / "run-a" / "checkpoint-2", world["data"], 2, seed=1)
    b = make_checkpoint(stories260k, tmp_path / "ckpt" / "run-b" / "checkpoint-2", world["data"], 2, seed=2)
    out = tmp_path / "evals"
    evaluated = watch_checkpoints(str(tmp_path / "ckpt"), world["config"], out_root=str(out))
    assert sorted(evaluated) == sorted([str(a), str(b)])
    entries = state_of(out)["checkpoints"]
    runs = {e["checkpoint"]: Path(e["run"]) for e in entries.values()}
    assert len(entries) == 2 and runs[str(a)] != runs[str(b)]
    for folder, run in runs.items():
        assert run.parent == out and run.name.startswith("checkpoint-2-")
        saved = json.loads((run / "config.json").read_text())
        assert saved["config"]["model"]["adapter"] == folder
        assert saved["split_source"] == "checkpoint training metadata"
    assert all(e["status"] == "done" and e["attempts"] == 1 for e in entries.values())
    written = {run: (run / "summary.json").stat().st_mtime_ns for run in runs.values()}
    # the next tick finds nothing new: no evaluation, nothing rewritten
    assert watch_checkpoints(str(tmp_path / "ckpt"), world["config"], out_root=str(out)) == []
    assert {run: (run / "summary.json").stat().st_mtime_ns for run in runs.values()} == written
    assert state_of(out)["checkpoints"] == entries
    assert pl.read_csv(out / "trend.csv").height == 2
    # one leaderboard per training run, with the checkpoint to ship (none: no implicit rewards, no judge) above it
    from prefect.client.orchestration import get_client

    from dpo_eval.flows.watch import leaderboard_key

    with get_client(sync_client=True) as client:
        for training_run in (a.parent, b.parent):
            found = client.read_latest_artifacts()
            board = [x for x in found if x.key == leaderboard_key(training_run)]
            assert len(board) == 1 and board[0].type == "table", [x.key for x in found]
            rows = json.loads(board[0].data) if isinstance(board[0].data, str) else board[0].data
            assert [r["checkpoint"] for r in rows] == ["checkpoint-2"] and rows[0]["alignment"] == "unknown"
            assert board[0].description.startswith(f"**{training_run}**: Checkpoint to ship: none: ")
    assert leaderboard_key(a.parent) != leaderboard_key(tmp_path / "elsewhere" / "run-a")


def test_checkpoint_without_metadata_waits_and_foreign_adapters_wait_one_tick(world, stories260k, tmp_path):
    from dpo_eval.flows.watch import watch_checkpoints

    from dpo_eval.data.pairs import read_pairs

    ckpt, out = tmp_path / "ckpt", tmp_path / "evals"
    folder = make_checkpoint(stories260k, ckpt / "checkpoint-4", world["data"], 4, seed=3, metadata=False)
    # trl has written the adapter, dpo-eval not yet the metadata: not evaluated, and said why
    assert watch_checkpoints(str(ckpt), world["config"], out_root=str(out)) == []
    state = state_of(out)
    assert state["checkpoints"] == {} and METADATA in state["waiting"][str(folder)]
    assert not [p for p in out.iterdir() if p.is_dir()]
    write_metadata(folder, read_pairs(DatasetSpec(source=str(world["data"])))[0], 4)
    assert watch_checkpoints(str(ckpt), world["config"], out_root=str(out)) == [str(folder)]
    assert state_of(out)["waiting"] == {}

    # an adapter trained elsewhere never gets metadata: with foreign_adapters it is evaluated once its
    # files are unchanged for one tick (and the data set's own split is used)
    foreign_dir, foreign_out = tmp_path / "foreign", tmp_path / "foreign-evals"
    foreign = make_checkpoint(stories260k, foreign_dir / "my-adapter", world["data"], 0, seed=4, metadata=False)
    assert watch_checkpoints(str(foreign_dir), world["config"], out_root=str(foreign_out),
                             foreign_adapters=True) == []
    assert "unchanged" in state_of(foreign_out)["waiting"][str(foreign)]
    assert watch_checkpoints(str(foreign_dir), world["config"], out_root=str(foreign_out),
                             foreign_adapters=True) == [str(foreign)]
    run = Path(next(iter(state_of(foreign_out)["checkpoints"].values()))["run"])
    assert json.loads((run / "config.json").read_text())["split_source"] == "data set"


def test_failed_evaluation_is_retried_next_tick_up_to_the_cap(world, stories260k, tmp_path):
    from dpo_eval.flows.watch import watch_checkpoints

    late = tmp_path / "late.jsonl"  # the data set is not there yet: the evaluation fails for real
    config = world["config"].model_copy(update={"dataset": DatasetSpec(source=str(late))})
    folder = make_checkpoint(stories260k, tmp_path / "ckpt" / "checkpoint-2", world["data"], 2, seed=5)
    out = tmp_path / "evals"
    with pytest.raises(RuntimeError, match="attempt 1 of 3"):
        watch_checkpoints(str(tmp_path / "ckpt"), config, out_root=str(out))
    (entry,) = state_of(out)["checkpoints"].values()
    assert entry["status"] == "failed" and entry["attempts"] == 1 and entry["error"].startswith("Failed")
    assert not (Path(entry["run"]) / "summary.json").exists()
    shutil.copy(world["data"], late)
    assert watch_checkpoints(str(tmp_path / "ckpt"), config, out_root=str(out)) == [str(folder)]
    (entry,) = state_of(out)["checkpoints"].values()
    assert entry["status"] == "done" and entry["attempts"] == 2 and (Path(entry["run"]) / "summary.json").is_file()
    assert watch_checkpoints(str(tmp_path / "ckpt"), config, out_root=str(out)) == []

    # a checkpoint that keeps failing is tried max_attempts times, then left alone
    missing = world["config"].model_copy(update={"dataset": DatasetSpec(source=str(tmp_path / "never.jsonl"))})
    capped = tmp_path / "capped"
    for attempt in (1, 2):
        with pytest.raises(RuntimeError, match=f"attempt {attempt} of 2"):
            watch_checkpoints(str(tmp_path / "ckpt"), missing, out_root=str(capped), max_attempts=2)
    assert watch_checkpoints(str(tmp_path / "ckpt"), missing, out_root=str(capped), max_attempts=2) == []
    (entry,) = state_of(capped)["checkpoints"].values()
    assert entry["status"] == "gave-up" and entry["attempts"] == 2


def test_run_folders_and_keys():
    from dpo_eval.flows.watch import run_folder_name

    a, b = Path("/x/run-a/checkpoint-20"), Path("/x/run-b/checkpoint-20")
    assert run_folder_name(a, "k") != run_folder_name(b, "k")  # same name, different training runs
    assert run_folder_name(a, "k") != run_folder_name(a, "k2")  # an adapter rewritten at the same path
    assert run_folder_name(a, "k") == run_folder_name(Path("/x/run-a/../run-a/checkpoint-20"), "k")


def test_the_watchers_key_follows_the_files_not_the_library_versions(stories260k, tmp_path, monkeypatch):
    from dpo_eval.flows.watch import checkpoint_key, earlier_key

    import dpo_eval.identity as identity

    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=3)
    spec = ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none", compute_dtype="float32")
    key, full = checkpoint_key(spec), earlier_key(spec)
    upgraded = dict(identity.library_versions(), peft="99.0.0")  # `pip install -U peft`
    monkeypatch.setattr(identity, "library_versions", lambda: upgraded)
    assert earlier_key(spec) != full  # the caches' key follows the upgrade ...
    assert checkpoint_key(spec) == key  # ... the watcher's record of what it evaluated does not
    other = make_adapter(stories260k, tmp_path / "other", zero=False, seed=4)
    assert checkpoint_key(spec.model_copy(update={"adapter": str(other)})) != key  # other files: another checkpoint


@flow(name="watch-test-child")
def child_flow() -> None:
    """A flow whose runs the test below moves through the states a worker and the crash automation set."""


def test_a_crashed_run_is_finished_only_out_of_restarts_or_after_the_grace(harness):
    """wait_for_run (the watcher's wait on a deployment run) against the real API: a Crashed run with restarts
    left is not finished until `crash_grace_s` passes without a reschedule; out of restarts it is at once; a
    rescheduled run is not final (the automation with a real crash: test_server_deployments.py)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed, Running, Scheduled

    from dpo_eval.flows.watch import run_state, wait_for_run

    with get_client(sync_client=True) as client:
        run_id = str(client.create_flow_run(child_flow).id)
        for state in (Running(), Crashed(message="worker preempted")):  # start 1 dies
            client.set_flow_run_state(run_id, state, force=True)
        run, why = wait_for_run(run_id, max_restarts=0, crash_grace_s=3600)  # started once, no restart allowed
        assert run.state.is_crashed() and run.run_count == 1 and why == "out of restarts"
        run, why = wait_for_run(run_id, max_restarts=1, crash_grace_s=0)  # a restart left, nobody reschedules it
        assert run.state.is_crashed() and why == "not rescheduled within 0 s"
        assert run_state(run_id).is_final()
        client.set_flow_run_state(run_id, Scheduled(message="rescheduled after a crash"), force=True)
        assert not run_state(run_id).is_final()  # the next tick waits for it (watch.resumable)
