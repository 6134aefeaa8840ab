"""One real `prefect server start` per test session (fixtures `server`, `on_server`, registered in conftest),
and the polling helpers of the tests that drive it."""

from __future__ import annotations

import contextvars
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 1):
    """Poll `check` until it returns something true; at most `timeout` seconds (and so a bounded count)."""
    deadline = time.time() + timeout
    for _ in range(int(timeout / interval) + 1):
        value = check()
        if value:
            return value
        if time.time() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def api_json(method: str, url: str, attempts: int = 5, **kwargs):
    """The JSON answer of a request to a test's Prefect server. A loaded session server (sqlite) now and then
    answers a write with an error (CI saw it on task-run and flow-run creation): try a few times, then fail
    with the server's answer instead of a KeyError on it."""
    for attempt in range(attempts):
        try:
            response = httpx.request(method, url, timeout=30, **kwargs)
        except httpx.TransportError as exc:
            response, error = None, exc
        else:
            if response.is_success:
                return response.json()
            error = f"{response.status_code} {response.text[:500]}"
        time.sleep(1 + attempt)
    raise AssertionError(f"{method} {url} failed {attempts} times; last: {error}")


def context_thread(fn) -> threading.Thread:
    """A started daemon thread that runs `fn` in this context: the Prefect settings that point at a test's server
    (temporary_settings) are context-local, and a plain thread would not see them."""
    thread = threading.Thread(target=contextvars.copy_context().run, args=(fn,), daemon=True)
    thread.start()
    return thread


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, with its whole group: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextmanager
def prefect_server(home: Path, ui: bool = False):
    """A real `prefect server start` on 127.0.0.1 and a free port, stopped on exit: yields (api, env); with
    `ui`, its UI calls this server's own API (not 127.0.0.1:4200)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="true" if ui else "false")
    if ui:
        env["PREFECT_SERVER_UI_API_URL"] = api
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "prefect server")
        yield api, env
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One `prefect server start` on 127.0.0.1 and a free port for the test session."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as started:
        yield started


@pytest.fixture
def on_server(server):
    """This process's Prefect client pointed at the session server.

    Prefect keeps one events worker per client type, not per API URL: left running, the worker made here
    would send a later module's events (its own test harness) to this server. Drain it on the way out, as
    prefect_test_harness does."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: server[0]}):
        try:
            yield server[0]
        finally:
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all(timeout=30)
