"""A live worker taken for dead, and two copies of one shard (flows/task_workers.py, tasks/leases.py), on the
session's real Prefect server with real `dpo-eval worker`s (ShardWorker, on a thread here): one whose API stops
accepting connections for longer than the lease, so that its lease writes fail, and then accepts them again; a
run given to another while it waits for a retry on its worker; and a result key written twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dpo_eval.flows.task_workers import ShardWorker, run_on_workers
from dpo_eval.tasks.leases import held_lease, lease_name
from prefect import task
from prefect.task_worker import StopTaskWorker

from tests.prefect_server import context_thread, free_port, wait_for

LEASE_S = 2.0
entered = threading.Event()  # a probe's body has started
release = threading.Event()  # a probe's body may return
BODIES: list[str] = []  # the task runs whose body ran, in order


@task(name="recovery-probe", persist_result=True, cache_key_fn=lambda context, parameters: f"probe-{parameters['x']}")
def probe(x: int, lease_s: float | None = None) -> dict:
    from prefect.runtime import task_run

    with held_lease(lease_s):
        BODIES.append(str(task_run.id))
        entered.set()
        if not release.wait(timeout=120):
            raise TimeoutError("the test never released the probe")
        return {"x": x, "doubled": 2 * x}


ATTEMPTS: list[int] = []  # the attempts whose body ran


@task(name="retry-probe", persist_result=True, retries=1, retry_delay_seconds=6,
      cache_key_fn=lambda context, parameters: f"retry-{parameters['x']}")
def flaky(x: int, lease_s: float | None = None) -> int:
    from prefect.runtime import task_run

    with held_lease(lease_s):
        ATTEMPTS.append(task_run.run_count)
        if len(ATTEMPTS) == 1:
            raise ConnectionError("a transient failure: the run waits for its retry on this worker")
        return 2 * x


@task(name="rewrite-probe", persist_result=True, refresh_cache=True, cache_key_fn=lambda context, parameters: "rewrite")
def rewrite(text: str, lease_s: float | None = None) -> str:
    with held_lease(lease_s):
        return text


class Outage:
    """A TCP forwarder from 127.0.0.1 to the Prefect API: `cut()` closes its listening socket, so a new connection
    is refused as by an API that is down; `restore()` listens again on the same port. Connections already open
    (the worker's subscription) are left alone; a lease write opens a new one each time."""

    def __init__(self, api: str):
        parts = urlsplit(api)
        self.target = (parts.hostname, parts.port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{parts.path}"
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []

    def __enter__(self) -> "Outage":
        self.restore()
        return self

    def __exit__(self, *exc) -> None:
        self.cut()
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.close()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut()
                return
            upstream = socket.create_connection(self.target)
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # pass the end of this direction on; the other may still be sending


@contextlib.contextmanager
def serving(api: str, results: Path, *tasks):
    """A real ShardWorker (limit 1) for `tasks` on a thread of this process, on the API at `api`, writing results
    under `results`; stopped on exit."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    loop, started = asyncio.new_event_loop(), {}

    async def serve() -> None:  # a TaskWorker is made inside its event loop
        started["worker"] = ShardWorker(*tasks, limit=1)
        await started["worker"].astart()

    def run() -> None:
        with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_LOCAL_STORAGE_PATH: str(results)}):
            loop.run_until_complete(serve())

    thread = context_thread(run)
    try:
        yield
    finally:
        wait_for(lambda: "worker" in started, 30, "the worker to start", interval=0.1)
        with contextlib.suppress(StopTaskWorker):  # how Prefect's worker says it stopped
            asyncio.run_coroutine_threadsafe(started["worker"].stop(), loop).result(timeout=30)
        thread.join(timeout=30)


def on_workers(results: Path, task_, calls: list[dict]):
    """run_on_workers as the evaluation flow calls it, with `results` as this side's result storage."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
        return run_on_workers(task_, calls, [1] * len(calls), lease_s=LEASE_S, stage="probe", unit="x")


def test_a_worker_whose_lease_writes_fail_longer_than_the_lease_leaves_one_result(on_server, tmp_path, caplog):
    """The worker's API refuses connections while the probe runs: its lease writes fail, the flow takes it for
    lost (Crashed) and submits the shard again. The API comes back, the first copy's lease writes recover and its
    body returns: it sees the run was given to another and stops unwritten; the second copy writes the result,
    equal to a clean run's."""
    from prefect import get_client
    from prefect.variables import Variable

    release.set()
    with serving(on_server, tmp_path / "clean", probe):
        clean = on_workers(tmp_path / "clean", probe, [{"x": 21}])
    assert clean.results == [{"x": 21, "doubled": 42}] and clean.resubmitted == []

    entered.clear(), release.clear(), BODIES.clear()
    outcome: dict = {}
    results = tmp_path / "recovered"
    with (caplog.at_level(logging.WARNING, logger="dpo_eval.tasks.leases"), Outage(on_server) as outage,
          serving(outage.url, results, probe), get_client(sync_client=True) as client):
        flow = context_thread(lambda: outcome.update(done=on_workers(results, probe, [{"x": 21}])))
        assert entered.wait(timeout=120), "the worker never started the probe"
        first = BODIES[0]
        outage.cut()  # the worker's lease writes fail from now on
        wait_for(lambda: client.read_task_run(first).state.is_crashed(), 60, "the flow to take the worker for lost",
                 interval=0.2)
        outage.restore()
        wait_for(lambda: Variable.get(lease_name(first), default=None), 60, "the worker's lease writes to recover",
                 interval=0.2)
        release.set()  # the first copy's body returns now, its run given to another
        flow.join(timeout=120)
        assert not flow.is_alive(), "the resubmitted shard never finished"
        stale = client.read_task_run(first).state
    done = outcome["done"]
    second = str(done.states[0].state_details.task_run_id)
    assert [(r["call"], r["task_run"]) for r in done.resubmitted] == [(0, first)]
    assert done.results == clean.results  # the one result, as a clean run makes it
    assert done.states[0].name == "Completed", "the second copy did not write the result (Cached: the first did)"
    assert stale.is_failed() and "GivenToAnother" in stale.message, f"the first copy went on to {stale}"
    assert BODIES == [first, second]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(lease_name(first))]
    assert said[0].startswith(f"{lease_name(first)}: write failed (") and said[0].endswith("retrying with back-off")
    assert said[1].startswith(f"{lease_name(first)}: written again after ")
    assert sorted(p.name for p in results.glob("*probe*")) == ["probe-21"]  # one result file, no temporary one
    assert [Variable.get(lease_name(run), default=None) for run in (first, second)] == [None, None]


def test_a_run_given_to_another_while_it_waits_for_a_retry_is_not_run_again(on_server, tmp_path):
    """The flow takes a run waiting for its retry on a worker for lost (marks it Crashed, as when the lease
    lapses); the retry then moves the run on from Crashed, which Prefect allows, so the worker reads the run's
    states, not only the last: the retry stops before the body runs and writes no result."""
    from dpo_eval.flows.task_workers import _give_up, _Watch
    from prefect import get_client
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    ATTEMPTS.clear()
    results = tmp_path / "results"
    with serving(on_server, results, flaky), get_client(sync_client=True) as client:
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(results)}):
            run = flaky.delay(21, lease_s=LEASE_S).task_run_id
        wait_for(lambda: client.read_task_run(run).state.name == "AwaitingRetry", 60, "the first attempt to fail",
                 interval=0.1)
        _give_up(client, run, _Watch(worker="w:1"), LEASE_S)  # what the flow does to a run whose lease lapsed
        assert ATTEMPTS == [1], "the retry started before the run was given away: the test came too late"
        wait_for(lambda: (state := client.read_task_run(run).state).is_final() and not state.is_crashed(), 60,
                 "the retry to end", interval=0.2)
        final = client.read_task_run(run).state
    assert final.is_failed() and "GivenToAnother" in final.message, f"the retry went on to {final}"
    assert ATTEMPTS == [1]  # the body did not run again
    assert list(results.glob("retry-*")) == []


def test_a_result_written_again_replaces_the_file_whole(on_server, tmp_path):
    """A key written a second time (as by two copies of a shard) is a new file renamed over the first: a reader
    that opened the first reads it whole, never the second's bytes over it."""
    results = tmp_path / "results"
    with serving(on_server, results, rewrite):
        assert on_workers(results, rewrite, [{"text": "first"}]).results == ["first"]
        stored = results / "rewrite"
        before = stored.read_bytes()
        with open(stored, "rb") as reader:  # a reader of the first result, mid-read
            assert on_workers(results, rewrite, [{"text": "second, and longer"}]).results == ["second, and longer"]
            assert reader.read() == before
            assert os.fstat(reader.fileno()).st_ino != stored.stat().st_ino
    assert stored.read_bytes() != before
    assert [p.name for p in results.iterdir() if p.name.endswith(".tmp")] == []


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
