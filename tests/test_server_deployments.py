"""A real `prefect server start`, `dpo-eval serve` against it, a run created through the REST API (what the
UI's Run button does), and the deployment, automation and docker files."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.builders import make_adapter

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false")
    prefect = Path(sys.executable).parent / "prefect"
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"

    def healthy():
        try:
            return httpx.get(f"{api}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 120, "prefect server")
        yield api, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_ui_style_run_of_a_served_deployment(server, tmp_path, stories260k, orca_jsonl):
    api, env = server
    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=3)
    defaults = {"dataset": {"source": str(orca_jsonl), "limit": 40}, "model": {"base": str(stories260k),
                "adapter": str(adapter)}, "out": str(tmp_path / "default-run")}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(defaults))
    serve_env = dict(env, PREFECT_API_URL=api, PREFECT_LOGGING_LEVEL="WARNING")
    serve = subprocess.Popen([sys.executable, "-m", "dpo_eval", "serve", "--config", str(tmp_path / "eval.yaml")],
                             env=serve_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, cwd=ROOT)
    try:
        def deployment():
            found = httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()
            return next((d for d in found if d["name"] == "local"), None)

        dep = wait_for(deployment, 120, "the served deployment")
        assert dep["parameters"]["config"]["dataset"]["limit"] == 40
        # non-default parameters, as a user would set them in the UI form
        params = {"config": defaults | {"dataset": {"source": str(orca_jsonl), "limit": 12},
                                        "generation": {"max_new_tokens": 8, "batch_size": 12},
                                        "scoring": {"cache_dir": str(tmp_path / "scores")},
                                        "analysis": {"bootstrap": 100}, "out": str(tmp_path / "ui-run")}}
        run = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params},
                         timeout=10).json()

        def finished():
            state = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        state = wait_for(finished, 400, "the flow run")
        assert state["type"] == "COMPLETED", state
        artifacts = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run["id"]]}}},
                               timeout=10).json()
        by_key = {a["key"]: a for a in artifacts}
        assert {"dpo-eval-summary", "dpo-eval-stats"} <= set(by_key)
        assert "sign agreement" in by_key["dpo-eval-summary"]["data"].lower()
        table = by_key["dpo-eval-stats"]["data"]
        rows = json.loads(table) if isinstance(table, str) else table
        assert len(rows) == 69 * 2 * 2
        summary = json.loads((tmp_path / "ui-run" / "summary.json").read_text())
        assert summary["n_pairs"]["train"] + summary["n_pairs"]["valid"] == 12  # the UI's limit, not the default
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=30)


def test_prefect_yaml_deployments_and_trigger():
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    gpu, scheduled = by_name["gpu"], by_name["scheduled"]
    assert gpu["entrypoint"] == "flows/evaluate.py:evaluate_checkpoint" and gpu["work_pool"]["name"] == "gpu-pool"
    assert scheduled["entrypoint"] == "flows/watch.py:watch_checkpoints" and scheduled["schedules"][0]["cron"]
    trigger = gpu["triggers"][0]
    assert trigger["expect"] == ["dpo_eval.checkpoint.saved"]
    assert "event.payload.folder" in trigger["parameters"]["config"]["model"]["adapter"]
    from dpo_eval.config import EvalConfig

    EvalConfig.model_validate(gpu["parameters"]["config"])  # the default parameters are a valid config
    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].split(":")
        source = (ROOT / module).read_text()
        assert f"def {name}(" in source


def test_crash_automation_reschedules_crashed_runs():
    sys.path.insert(0, str(ROOT / "deployments"))
    from automations import crash_restart_automation

    automation = crash_restart_automation("0000-dep", "evaluate-checkpoint/gpu")
    assert automation.trigger.expect == {"prefect.flow-run.Crashed"}
    assert automation.actions[0].type == "change-flow-run-state" and automation.actions[0].state.value == "SCHEDULED"


def test_docker_files_install_what_the_makefile_installs():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "cpu-worker", "gpu-worker"} <= set(services)
    assert "postgresql+asyncpg" in json.dumps(services["prefect-server"]["environment"])
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for image in ("Dockerfile.gpu", "Dockerfile.cpu"):
        text = (ROOT / "docker" / image).read_text()
        assert "make install" in text and "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule" in text
    assert "nvidia/cuda" in (ROOT / "docker" / "Dockerfile.gpu").read_text()
