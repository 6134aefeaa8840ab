"""What dpo-eval relies on of Prefect, pinned: on an upgrade that changes any of it this fails and says what changed,
instead of the task workers breaking in silence. All of it is public (no underscore name is used); the REST routes
are read through the client's public `request`. Supported: prefect>=3.9,<3.10 (pyproject.toml)."""

from __future__ import annotations

import asyncio
import inspect
import typing

import prefect
import pytest

RELIED_ON = "dpo_eval.flows.task_workers relies on it; supported Prefect: >=3.9,<3.10"


def test_task_worker_runs_a_task_run_it_is_handed():
    from prefect import task
    from prefect.task_worker import TaskWorker

    @task
    def probe(x: int) -> int:
        return x

    async def check() -> None:
        worker = TaskWorker(probe, limit=2)  # made inside its event loop, as dpo-eval worker does
        assert isinstance(worker.client_id, str) and worker.client_id, f"TaskWorker.client_id changed: {RELIED_ON}"
        assert worker.task_keys == {probe.task_key}, f"TaskWorker.task_keys changed: {RELIED_ON}"
        assert hasattr(worker, "__aenter__") and hasattr(worker, "__aexit__"), \
            f"TaskWorker is no longer an async context manager: {RELIED_ON}"

    asyncio.run(check())
    assert inspect.iscoroutinefunction(TaskWorker.execute_task_run), \
        f"TaskWorker.execute_task_run is no longer a coroutine function: {RELIED_ON}"
    assert list(inspect.signature(TaskWorker.execute_task_run).parameters) == ["self", "task_run"], \
        f"TaskWorker.execute_task_run(task_run) changed: {RELIED_ON}"


def test_the_subscription_to_scheduled_task_runs():
    from dpo_eval.flows.task_workers import SCHEDULED_ROUTE
    from prefect.client.orchestration.routes import ServerRoutes
    from prefect.client.subscriptions import Subscription

    params = inspect.signature(Subscription).parameters
    for name in ("model", "path", "keys", "client_id", "base_url"):
        assert name in params, f"Subscription() lost its {name!r} parameter: {RELIED_ON}"
    assert hasattr(Subscription, "__anext__"), f"Subscription is no longer an async iterator: {RELIED_ON}"
    routes = set(typing.get_args(ServerRoutes))
    for route in ("/variables/filter", "/task_workers/filter"):
        assert route in routes, f"Prefect {prefect.__version__} has no REST route {route}: {RELIED_ON}"
    # the websocket route is not among ServerRoutes: it must be the one Prefect's own task worker subscribes to
    from prefect.task_worker import TaskWorker

    assert f'"{SCHEDULED_ROUTE}"' in inspect.getsource(TaskWorker), \
        f"Prefect {prefect.__version__}'s TaskWorker no longer subscribes to {SCHEDULED_ROUTE}: {RELIED_ON}"


def test_the_clients_public_request_and_calls():
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.variables import Variable

    assert list(inspect.signature(SyncPrefectClient.request).parameters)[:3] == ["self", "method", "path"], \
        f"SyncPrefectClient.request(method, path, ...) changed: {RELIED_ON}"
    for name in ("read_task_runs", "read_task_run", "set_task_run_state"):
        assert callable(getattr(SyncPrefectClient, name, None)), f"SyncPrefectClient.{name} is gone: {RELIED_ON}"
    for name in ("set", "get", "unset"):
        assert callable(getattr(Variable, name, None)), f"Variable.{name} is gone: {RELIED_ON}"


def test_what_the_workers_results_and_leases_rely_on():
    """The shard worker's atomic results and the leases' fast writes: the result store's default storage, a
    LocalFileSystem subclass saved as a block (the result store calls write_path / awrite_path on it), a task given
    another result storage, the task run's state history, the subscription's websocket, the client's retry setting."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.subscriptions import Subscription
    from prefect.filesystems import LocalFileSystem
    from prefect.results import aget_default_result_storage
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES  # noqa: F401 - imported is the pin
    from prefect.tasks import Task

    assert inspect.iscoroutinefunction(aget_default_result_storage), RELIED_ON
    for name in ("write_path", "read_path", "asave"):
        assert callable(getattr(LocalFileSystem, name, None)), f"LocalFileSystem.{name} is gone: {RELIED_ON}"
    assert "result_storage" in inspect.signature(Task.with_options).parameters, RELIED_ON
    assert callable(getattr(SyncPrefectClient, "read_task_run_states", None)), RELIED_ON
    assert "websocket" in inspect.getsource(Subscription), f"Subscription has no websocket to close: {RELIED_ON}"


def test_no_private_prefect_name_is_used():
    """The project's own code names no underscore attribute of a Prefect object (client._client, a worker's
    _limiter, ...): only what the tests above pin."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.glob("flows/*.py"), *root.glob("tasks/*.py"), *root.glob("dpo_eval/**/*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prefect"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
                if any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"{path.name}: from {node.module}")
            if isinstance(node, ast.Attribute) and node.attr in ("_client", "_limiter", "_acquire_token",
                                                                  "_subscribe_to_task_scheduling", "_runs_task_group",
                                                                  "_safe_submit_scheduled_task_run"):
                found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert found == [], found


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
