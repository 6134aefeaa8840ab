"""Leases of shards on task workers (tasks/leases.py, flows/task_workers.py): renewal tied to progress, the
`received` mark of a task run a worker took but never started, and the flow's side of both, on the session's
real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from dpo_eval.flows.task_workers import ShardWorker, _leases, _lost, _Watch, run_on_workers
from dpo_eval.tasks.leases import (
    RECEIVED,
    WORKER_LEASES,
    Renewal,
    end_worker_lease,
    held_lease,
    lease_name,
    start_worker_lease,
)
from prefect import task
from prefect.task_worker import StopTaskWorker

from tests.prefect_server import context_thread


@task(name="lease-probe", persist_result=True, cache_policy=None)
def doubled(x: int, lease_s: float | None = None) -> int:
    with held_lease(lease_s):
        return 2 * x


def test_a_lease_is_renewed_while_work_progresses_and_lapses_when_it_stalls():
    beats: list[int] = []
    renewal = Renewal(beats.append, every=0.1, stall_s=0.5).start()
    try:
        until = time.monotonic() + 1.0
        while time.monotonic() < until:  # a batch finishes every 50 ms
            renewal.progress()
            time.sleep(0.05)
        assert len(beats) >= 3 and beats == sorted(beats) and not renewal.stalled
        time.sleep(1.0)  # no progress for twice stall_s: renewals have stopped
        stopped_at = list(beats)
        time.sleep(0.6)
        assert beats == stopped_at and renewal.stalled
        renewal.progress()  # work moving again: renewals resume
        time.sleep(0.5)
        assert len(beats) > len(stopped_at)
    finally:
        renewal.stop()
    always = []
    plain = Renewal(always.append, every=0.05).start()  # no stall_s: renewed whatever the work does
    time.sleep(0.5)
    plain.stop()
    assert len(always) >= 3 and not plain.stalled


def test_the_flow_tells_a_waiting_shard_from_one_taken_and_never_started():
    waiting, taken, running = _Watch(), _Watch(), _Watch()
    time.sleep(0.05)
    assert not _lost(None, waiting, 0.01, scheduled=True)  # queued for a worker: never lost
    assert not _lost({"worker": "w", "beat": RECEIVED}, taken, 0.01, scheduled=True)  # first sight of the mark
    time.sleep(0.05)
    assert _lost({"worker": "w", "beat": RECEIVED}, taken, 0.01, scheduled=True) and taken.worker == "w"
    assert not _lost({"worker": "w", "beat": 1}, running, 0.2)
    assert not _lost({"worker": "w", "beat": 2}, running, 0.2)  # renewed
    time.sleep(0.3)
    assert _lost({"worker": "w", "beat": 2}, running, 0.2)  # not renewed for lease_s
    assert _lost(None, _Watch(since=time.monotonic() - 1), 0.2)  # Running, the lease gone for lease_s


def test_a_worker_lease_starts_received_and_is_read_in_one_request(on_server):
    from prefect import get_client

    ids = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(3)]
    for run in ids[:2]:
        start_worker_lease(run)
    try:
        with get_client(sync_client=True) as client:
            leases = _leases(client, ids)
            assert set(leases) == set(ids[:2]) and all(v["beat"] == RECEIVED for v in leases.values())
            time.sleep(2.5)  # renewed every second until a task sets its interval
            assert all(isinstance(v["beat"], int) and v["beat"] >= 1 for v in _leases(client, ids).values())
            end_worker_lease(ids[0])
            assert set(_leases(client, ids)) == {ids[1]} and ids[0] not in WORKER_LEASES
    finally:
        end_worker_lease(ids[1])


def test_a_shard_taken_by_a_worker_that_died_before_starting_it_goes_to_another(on_server):
    """No worker at first: the test leaves a `received` mark on the queued task run, as a worker killed between
    taking it and starting it would. The flow marks that run Crashed and submits the shard again; a real
    `dpo-eval worker` (ShardWorker, in a thread here) started afterwards runs it."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.variables import Variable

    outcome: dict = {}
    def submit_and_wait() -> None:
        outcome["done"] = run_on_workers(doubled, [{"x": 21}], [1], lease_s=1.0, stage="probe", unit="x")

    flow_side = context_thread(submit_and_wait)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 60
        while not (runs := client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(
                like_="lease-probe")))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(runs) == 1 and runs[0].state.is_scheduled()
        ghost = runs[0].id
        Variable.set(lease_name(ghost), {"worker": "ghost:1", "beat": RECEIVED}, overwrite=True)
        while not client.read_task_run(ghost).state.is_final() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.read_task_run(ghost).state.name == "Crashed"

        loop, started = asyncio.new_event_loop(), {}

        async def serve() -> None:  # a TaskWorker is made inside its event loop
            started["worker"] = ShardWorker(doubled, limit=1)
            await started["worker"].astart()

        serving = context_thread(lambda: loop.run_until_complete(serve()))
        try:
            flow_side.join(timeout=90)
            assert not flow_side.is_alive(), "the resubmitted shard was never run"
        finally:
            with contextlib.suppress(StopTaskWorker):  # how Prefect's worker says it stopped
                asyncio.run_coroutine_threadsafe(started["worker"].stop(), loop).result(timeout=30)
            serving.join(timeout=30)
    done = outcome["done"]
    assert done.results == [42]
    assert [(r["call"], r["task_run"], r["worker"]) for r in done.resubmitted] == [(0, str(ghost), "ghost:1")]
    assert Variable.get(lease_name(ghost), default=None) is None  # the flow dropped the dead worker's mark


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
