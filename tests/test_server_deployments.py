"""A real `prefect server start` (one per test session), `dpo-eval serve` against it, a run created through
the REST API (what the UI's Run button does), `prefect deploy` of deployments/prefect.yaml with its trigger,
the crash automation on a really crashed run, the watcher through a deployment, and the docker files."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect import flow

from dpo_eval.config import EvalConfig
from tests.builders import make_adapter
from tests.prefect_server import api_json, stop, wait_for

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


@flow(name="crash-probe")
def crash_probe(max_restarts: int, pid_dir: str) -> int:
    """A flow that waits to be killed, behind the real restart cap (flows/restarts.py)."""
    from dpo_eval.flows.restarts import check_restarts

    start = check_restarts(max_restarts)
    Path(pid_dir, f"start-{start}.pid").write_text(str(os.getpid()))
    time.sleep(300)  # the test SIGKILLs this process long before
    return start


@flow(name="evaluate-stub")
def evaluate_stub(config: EvalConfig) -> str:
    """Stands in for evaluate-checkpoint behind a deployment: fails while the data set is missing."""
    if not Path(config.dataset.source).is_file():
        raise FileNotFoundError(config.dataset.source)
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "stub.json").write_text(json.dumps({"adapter": config.model.adapter}))
    return str(config.out)


SERVE_TEST_FLOWS = ("from prefect import serve\n"
                    "from tests.test_server_deployments import crash_probe, evaluate_stub\n"
                    "serve(crash_probe.to_deployment('probe', concurrency_limit=1),\n"
                    "      evaluate_stub.to_deployment('stub', concurrency_limit=1))\n")


def deployment_named(api: str, flow_name: str, name: str) -> dict | None:
    found = httpx.post(f"{api}/deployments/filter", json={"flows": {"name": {"any_": [flow_name]}},
                                                         "deployments": {"name": {"any_": [name]}}},
                       timeout=10).json()
    return found[0] if found else None


@pytest.fixture(scope="module")
def served_flows(server, tmp_path_factory):
    """crash-probe/probe and evaluate-stub/stub served by one runner process (polling every second)."""
    api, env = server
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    serve_env = dict(env, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="INFO",
                     PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SERVE_TEST_FLOWS], env=serve_env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {name: wait_for(lambda: deployment_named(api, flow_name, name), 120, f"deployment {name}")
               for flow_name, name in (("crash-probe", "probe"), ("evaluate-stub", "stub"))}
    finally:
        stop(proc)
        log.close()


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
        run = api_json("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params})

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
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(spec)
    by_name = {d["name"]: d for d in spec["deployments"]}
    gpu, scheduled = by_name["gpu"], by_name["scheduled"]
    assert gpu["entrypoint"] == "dpo_eval.flows.evaluate:evaluate_checkpoint" and gpu["work_pool"]["name"] == "gpu-pool"
    assert scheduled["entrypoint"] == "dpo_eval.flows.watch:watch_checkpoints" and scheduled["schedules"][0]["cron"]
    # one path evaluates checkpoints: the watcher; the event only starts a watcher tick
    assert "triggers" not in gpu and scheduled["parameters"]["deployment"] == "evaluate-checkpoint/gpu"
    (trigger,) = scheduled["triggers"]
    assert trigger["expect"] == ["dpo_eval.checkpoint.saved"] and trigger["enabled"] and "parameters" not in trigger
    assert scheduled["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert gpu["concurrency_limit"]["limit"] >= 1
    from dpo_eval.config import EvalConfig

    EvalConfig.model_validate(gpu["parameters"]["config"])  # the default parameters are a valid config
    from dpo_eval.config import ForgettingSpec, ModelSpec

    judge, benchmarks = by_name["judge"], by_name["forgetting"]
    assert judge["entrypoint"] == "dpo_eval.flows.judge:judge_existing_run" and judge["parameters"]["run_dir"]
    ModelSpec.model_validate(benchmarks["parameters"]["model"])
    ForgettingSpec.model_validate(benchmarks["parameters"]["forgetting"])
    for deployment in spec["deployments"]:
        module, name = deployment["entrypoint"].split(":")  # a module of the installed package, not a file path
        from prefect import Flow

        assert isinstance(getattr(importlib.import_module(module), name), Flow), deployment["entrypoint"]


def test_prefect_deploy_registers_limits_and_the_checkpoint_trigger(server, tmp_path):
    """`prefect deploy` of deployments/prefect.yaml against the server; a checkpoint event starts a watcher
    tick, never an evaluation."""
    api, env = server
    for pool in ("gpu-pool", "cpu-pool"):
        response = httpx.post(f"{api}/work_pools/", json={"name": pool, "type": "process"}, timeout=10)
        assert response.status_code in (201, 409), response.text
    prefect = Path(sys.executable).parent / "prefect"
    deploy_env = dict(env, PREFECT_API_URL=api)
    deployed = subprocess.run([str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file",
                               "deployments/prefect.yaml"], env=deploy_env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    gpu = deployment_named(api, "evaluate-checkpoint", "gpu")
    scheduled = deployment_named(api, "watch-checkpoints", "scheduled")
    assert gpu["global_concurrency_limit"]["limit"] == 1
    assert gpu["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    assert scheduled["global_concurrency_limit"]["limit"] == 1
    assert scheduled["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    automations = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
    triggered = [a for a in automations if "dpo_eval.checkpoint.saved" in a["trigger"].get("expect", [])]
    assert [a["actions"][0]["deployment_id"] for a in triggered] == [scheduled["id"]]

    folder = tmp_path / "run-x" / "checkpoint-2"
    folder.mkdir(parents=True)
    announce = "import sys\nfrom pathlib import Path\nfrom dpo_eval.flows.train import announce\nannounce(Path(sys.argv[1]))\n"
    emitted = subprocess.run([sys.executable, "-c", announce, str(folder)], env=dict(deploy_env, PYTHONPATH=str(ROOT)),
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert emitted.returncode == 0, emitted.stderr[-3000:]

    def runs_of(deployment):
        found = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
                           timeout=10).json()
        return [r for r in found if (r.get("created_by") or {}).get("type") == "AUTOMATION"]

    (tick,) = wait_for(lambda: runs_of(scheduled), 90, "the watcher tick started by the checkpoint event")
    assert tick["parameters"]["deployment"] == "evaluate-checkpoint/gpu"
    assert runs_of(gpu) == []


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def test_crash_automation_reschedules_crashed_runs_until_the_cap(server, on_server, served_flows, tmp_path):
    """A served run SIGKILLed mid-run crashes for real; the automation reschedules it; started more than
    max_restarts + 1 times, the run fails (the real cap, flows/restarts.py) and stays failed."""
    sys.path.insert(0, str(ROOT / "deployments"))
    from automations import crash_restart_automation
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    api = on_server
    probe = served_flows["probe"]
    automation = crash_restart_automation(probe["id"], "crash-probe/probe").create()
    try:
        run = httpx.post(f"{api}/deployments/{probe['id']}/create_flow_run",
                         json={"parameters": {"max_restarts": 1, "pid_dir": str(tmp_path)}}, timeout=10).json()
        pids = []
        for start in (1, 2):
            pid = wait_for(lambda: read_pid(tmp_path / f"start-{start}.pid"), 120, f"start {start} of the run")
            os.kill(pid, signal.SIGKILL)  # the spot instance vanishes mid-run
            pids.append(pid)

        def final():
            current = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
            return current if current["state"]["type"] in ("FAILED", "COMPLETED", "CANCELLED") else None

        ended = wait_for(final, 120, "the run to be rescheduled and then stopped by max_restarts")
        assert ended["state"]["type"] == "FAILED", ended["state"]
        assert "max_restarts=1" in ended["state"]["message"]
        assert ended["run_count"] == 3 and len(set(pids)) == 2
        assert not (tmp_path / "start-3.pid").exists()  # the third start stopped before doing any work
        history = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
        types = [s["type"] for s in sorted(history, key=lambda s: s["timestamp"])]
        assert types.count("CRASHED") == 2 and types[-1] == "FAILED"
        rescheduled = [s for s in history if s["type"] == "SCHEDULED" and "after a crash" in (s["message"] or "")]
        assert len(rescheduled) == 2

        def crashed_events():  # the server stores events a moment after the states they report
            with get_client(sync_client=True) as client:
                found = client.read_events(EventFilter(event=EventNameFilter(name=["prefect.flow-run.Crashed"]),
                                                       resource=EventResourceFilter(id=[f"prefect.flow-run.{run['id']}"])),
                                           limit=50).events
            return found if len(found) >= 2 else None

        assert len(wait_for(crashed_events, 60, "both Crashed events to be stored")) == 2
        time.sleep(3)  # a failed run is not rescheduled
        assert httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()["state"]["type"] == "FAILED"
    finally:
        automation.delete()


def test_watcher_through_a_deployment_runs_each_checkpoint_once(on_server, served_flows, stories260k, tmp_path):
    """The watcher with `deployment`: a failed child run is retried next tick with a new idempotency key; a
    tick that died while waiting re-attaches to its child run instead of starting another."""
    from dpo_eval.flows.watch import watch_checkpoints

    from dpo_eval.data.demo import write_demo_dataset
    from tests.test_watch import make_checkpoint, small_config

    api = on_server
    source = write_demo_dataset(tmp_path / "source.jsonl", n=16)
    a = make_checkpoint(stories260k, tmp_path / "ckpt" / "run-a" / "checkpoint-2", source, 2, seed=1)
    b = make_checkpoint(stories260k, tmp_path / "ckpt" / "run-b" / "checkpoint-2", source, 2, seed=2)
    late, out = tmp_path / "pairs.jsonl", tmp_path / "evals"
    config = small_config(late, stories260k, tmp_path / "scores")

    def tick():
        return sorted(watch_checkpoints(str(tmp_path / "ckpt"), config, out_root=str(out),
                                        deployment="evaluate-stub/stub"))

    with pytest.raises(RuntimeError, match="attempt 1 of 3"):
        tick()
    shutil.copy(source, late)
    assert tick() == sorted([str(a), str(b)])
    assert tick() == []
    state = json.loads((out / "evaluated.json").read_text())
    done = {e["flow_run"] for e in state["checkpoints"].values()}
    for entry in state["checkpoints"].values():  # as a tick killed while waiting on its child runs leaves it
        entry["status"] = "running"
    (out / "evaluated.json").write_text(json.dumps(state))
    assert tick() == sorted([str(a), str(b)])
    state = json.loads((out / "evaluated.json").read_text())
    assert {e["flow_run"] for e in state["checkpoints"].values()} == done
    assert all(e["status"] == "done" and e["attempts"] == 2 for e in state["checkpoints"].values())
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
        "flow_runs": {"deployment_id": {"any_": [served_flows["stub"]["id"]]}}}).json()
    assert sorted(r["state"]["type"] for r in runs) == ["COMPLETED", "COMPLETED", "FAILED", "FAILED"]
    assert len({r["idempotency_key"] for r in runs}) == 4
    assert {r["id"] for r in runs if r["state"]["type"] == "COMPLETED"} == done
    outs = {json.loads((Path(e["run"]) / "stub.json").read_text())["adapter"] for e in state["checkpoints"].values()}
    assert outs == {str(a), str(b)}


def test_docker_files_install_what_the_makefile_installs():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "prefect-server", "cpu-worker", "pool-worker", "gpu-worker"} <= set(services)
    assert "postgresql+asyncpg" in json.dumps(services["prefect-server"]["environment"])
    for worker in ("cpu-worker", "pool-worker", "gpu-worker"):  # one result storage that all workers share
        assert services[worker]["environment"]["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] == "/results"
        assert services[worker]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
        assert "results:/results" in services[worker]["volumes"]
    assert "results" in compose["volumes"]
    for worker in ("pool-worker", "gpu-worker"):
        devices = services[worker]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1
    # the task workers scale (--scale gpu-worker=N): no fixed name, and each runs `dpo-eval worker`
    assert services["gpu-worker"]["command"] == ["dpo-eval", "worker"] and "container_name" not in services["gpu-worker"]
    for image in ("Dockerfile.gpu", "Dockerfile.cpu"):
        text = (ROOT / "docker" / image).read_text()
        assert "make install" in text and "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule" in text
    assert "nvidia/cuda" in (ROOT / "docker" / "Dockerfile.gpu").read_text()
