"""Leases of shards on task workers (tasks/leases.py, flows/task_workers.py): renewal tied to progress, failed
writes retried with back-off, the `received` mark of a task run a worker took but never started, and the flow's
side of both, on the session's real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from dpo_eval.flows.task_workers import ShardWorker, _leases, _lost, _Watch, run_on_workers
from dpo_eval.tasks.leases import (
    PREFIX,
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

from tests.prefect_server import context_thread, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_failed_lease_write_is_logged_and_retried_with_back_off(caplog):
    """An API that refuses three writes in a row, then takes them: each failure is retried after a back-off
    shorter than the renewal interval (an hour here), and the log says so once, and once more on recovery."""
    attempts: list = []

    def write(beat) -> None:
        attempts.append(beat)
        if len(attempts) <= 3:
            raise ConnectionError("the API refused the connection")

    with caplog.at_level(logging.WARNING, logger="dpo_eval.tasks.leases"):
        renewal = Renewal(write, every=3600).start()
        try:
            wait_for(lambda: len(attempts) >= 4, 30, "the failed writes to be retried", interval=0.05)
        finally:
            renewal.stop()
    assert attempts == [0, 1, 2, 3] and renewal.failures == 0
    assert [r.getMessage() for r in caplog.records if r.name == "dpo_eval.tasks.leases"] == [
        "lease: write failed (ConnectionError: the API refused the connection); retrying with back-off",
        "lease: written again after 3 failed writes"]
    from dpo_eval.tasks.leases import retry_delay

    assert [retry_delay(3600, n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 2.0]  # doubled each time
    assert retry_delay(1.0, 10) == 1.0  # never longer than the renewal interval


class BusyAPI(ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that answers every request 503 (an API under load), with Retry-After: 0 so
    that a client retrying does so at once; it counts the requests."""

    def __init__(self):
        requests = self.requests = []

        class Busy(BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PATCH = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Busy)
        self.url = f"http://127.0.0.1:{self.server_port}/api"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_lease_write_the_api_turns_away_fails_at_once():
    """A lease write answered 503 fails on its first request, and Renewal retries it with its own back-off,
    never longer than the renewal interval. It does not go through the Prefect client's own retries first: five
    more, with up to a minute of back-off, while the lease goes unrenewed."""
    from dpo_eval.tasks.leases import _writer
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = BusyAPI()
    try:
        with temporary_settings(updates={PREFECT_API_URL: api.url}):
            with pytest.raises(PrefectHTTPStatusError):
                _writer("00000000-0000-0000-0000-000000000001", "w:1")(1)
    finally:
        api.shutdown()
        api.server_close()
    assert api.requests == [f"/api/variables/name/{lease_name('00000000-0000-0000-0000-000000000001')}"]


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


def load_when(value, gate: str):
    """Unpickling a SlowToLoad: `value` once `gate` exists."""
    while not Path(gate).exists():
        time.sleep(0.1)
    return value


class SlowToLoad:
    """A task parameter whose loading waits until a file exists: parameters on storage that does not answer."""

    def __init__(self, value, gate: Path):
        self.value, self.gate = value, gate

    def __reduce__(self):
        return load_when, (self.value, str(self.gate))


# a `dpo-eval worker` of the lease probe, in its own process (PREFECT_API_URL and the result storage from its env)
DYING_WORKER = """
import asyncio
from dpo_eval.flows.task_workers import ShardWorker
from tests.test_leases import doubled

async def main():
    await ShardWorker(doubled, limit=1).astart()

asyncio.run(main())
"""


def test_a_shard_taken_by_a_worker_that_died_before_starting_it_goes_to_another(on_server, tmp_path):
    """A real worker, in its own process, takes the shard and dies (SIGKILL) while its parameters are still
    loading: the run is Scheduled, with that worker's lease, which stops being renewed. The flow marks the run
    Crashed and submits the shard again; another worker (ShardWorker on a thread here) runs it."""
    from prefect import get_client
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.variables import Variable

    results, gate = tmp_path / "results", tmp_path / "parameters-answer"
    outcome: dict = {}

    def submit_and_wait() -> None:
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
            outcome["done"] = run_on_workers(doubled, [{"x": SlowToLoad(21, gate)}], [1], lease_s=4.0,
                                             stage="probe", unit="x")

    flow_side = context_thread(submit_and_wait)
    env = dict(os.environ, PREFECT_API_URL=on_server, PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results),
               PYTHONPATH=str(ROOT))
    with open(tmp_path / "dying-worker.log", "w") as log:
        dying = subprocess.Popen([sys.executable, "-c", DYING_WORKER], env=env, cwd=ROOT, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    label = f"{socket.gethostname()}:{dying.pid}"  # dpo_eval.stages.worker_label of that process

    def its_lease():
        assert dying.poll() is None, f"the worker exited:\n{(tmp_path / 'dying-worker.log').read_text()[-3000:]}"
        leases = httpx.post(f"{on_server}/variables/filter", json={"variables": {"name": {"like_": f"{PREFIX}%"}}},
                            timeout=10).json()
        return next((lease for lease in leases if lease["value"]["worker"] == label), None)

    with get_client(sync_client=True) as client:
        try:
            held = wait_for(its_lease, 120, "the worker to take the shard", interval=0.1)
            ghost = held["name"].removeprefix(PREFIX)
            assert client.read_task_run(ghost).state.is_scheduled()  # taken by the worker, not started
            os.killpg(dying.pid, signal.SIGKILL)  # no goodbye
            dying.wait(timeout=30)
        finally:
            stop(dying)
        wait_for(lambda: client.read_task_run(ghost).state.is_final(), 60, "the flow to take the shard for lost",
                 interval=0.2)
        lost = client.read_task_run(ghost).state
        assert lost.name == "Crashed" and label in lost.message

        gate.touch()  # the parameters load now, for the worker that takes the shard next
        loop, started = asyncio.new_event_loop(), {}

        async def serve() -> None:  # a TaskWorker is made inside its event loop
            started["worker"] = ShardWorker(doubled, limit=1)
            await started["worker"].astart()

        def serving_thread() -> None:
            with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
                loop.run_until_complete(serve())

        serving = context_thread(serving_thread)
        try:
            flow_side.join(timeout=90)
            assert not flow_side.is_alive(), "the resubmitted shard was never run"
        finally:
            wait_for(lambda: "worker" in started, 30, "the worker to start", interval=0.1)
            with contextlib.suppress(StopTaskWorker):  # how Prefect's worker says it stopped
                asyncio.run_coroutine_threadsafe(started["worker"].stop(), loop).result(timeout=30)
            serving.join(timeout=30)
    done = outcome["done"]
    assert done.results == [42]
    assert [(r["call"], r["task_run"], r["worker"]) for r in done.resubmitted] == [(0, ghost, label)]
    assert Variable.get(lease_name(ghost), default=None) is None  # the flow dropped the dead worker's lease


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
