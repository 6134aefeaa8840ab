"""A real `prefect server start` (one per test session), `dpo-eval serve` against it, a run created through
the REST API (what the UI's Run button does), `prefect deploy` of deployments/prefect.yaml with its trigger and
a watcher tick it starts, the crash automation on a really crashed run, the watcher through a deployment (also
through crashes that the automation restarts), and the docker files."""

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
from tests.prefect_server import api_json, context_thread, stop, wait_for

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


@flow(name="evaluate-crashing")
def evaluate_crashing(config: EvalConfig) -> str:
    """Stands in for evaluate-checkpoint on a preempted GPU worker, behind the real restart cap: each start is
    a line of starts.txt in the run folder; the first start dies (SIGKILL: the run crashes), a later one waits
    while `<data set>.hold` exists, then writes stub.json."""
    from dpo_eval.flows.restarts import check_restarts

    start = check_restarts(config.max_restarts)
    config.out.mkdir(parents=True, exist_ok=True)
    with open(config.out / "starts.txt", "a") as starts:
        starts.write(f"{start}\n")
    if start == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    hold = Path(config.dataset.source).with_suffix(".hold")
    for _ in range(600):  # at most 5 minutes
        if not hold.exists():
            break
        time.sleep(0.5)
    (config.out / "stub.json").write_text(json.dumps({"adapter": config.model.adapter}))
    return str(config.out)


SERVE_TEST_FLOWS = ("from prefect import serve\n"
                    "from tests.test_server_deployments import crash_probe, evaluate_crashing, evaluate_stub\n"
                    "serve(crash_probe.to_deployment('probe', concurrency_limit=1),\n"
                    "      evaluate_stub.to_deployment('stub', concurrency_limit=1),\n"
                    "      evaluate_crashing.to_deployment('crashing', concurrency_limit=1))\n")


def deployment_named(api: str, flow_name: str, name: str) -> dict | None:
    found = httpx.post(f"{api}/deployments/filter", json={"flows": {"name": {"any_": [flow_name]}},
                                                         "deployments": {"name": {"any_": [name]}}},
                       timeout=10).json()
    return found[0] if found else None


@pytest.fixture(scope="module")
def served_flows(server, tmp_path_factory):
    """crash-probe/probe, evaluate-stub/stub and evaluate-crashing/crashing served by one runner process
    (polling every second)."""
    api, env = server
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    serve_env = dict(env, PREFECT_API_URL=api, PREFECT_RUNNER_POLL_FREQUENCY="1", PREFECT_LOGGING_LEVEL="INFO",
                     PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SERVE_TEST_FLOWS], env=serve_env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {name: wait_for(lambda: deployment_named(api, flow_name, name), 120, f"deployment {name}")
               for flow_name, name in (("crash-probe", "probe"), ("evaluate-stub", "stub"),
                                       ("evaluate-crashing", "crashing"))}
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


def runs_of(api: str, deployment: dict, created_by: str | None = None) -> list[dict]:
    """The flow runs of `deployment` (only those created by `created_by`, e.g. "AUTOMATION", when given)."""
    found = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
                       timeout=10).json()
    return [r for r in found if created_by is None or (r.get("created_by") or {}).get("type") == created_by]


def test_prefect_deploy_registers_limits_and_the_checkpoint_trigger(server, tmp_path, stories260k):
    """`prefect deploy` of deployments/prefect.yaml against the server; a checkpoint event starts a watcher
    tick, never an evaluation; that tick, executed as a worker executes it, evaluates the real checkpoint
    exactly once, through evaluate-checkpoint/gpu."""
    from dpo_eval.data.demo import write_demo_dataset
    from tests.test_watch import make_checkpoint, small_config

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

    # this machine's folders in place of the images' (/opt/dpo-eval, /checkpoints, /runs, /data), as a site sets them
    data = write_demo_dataset(tmp_path / "pairs.jsonl", n=16)
    folder = make_checkpoint(stories260k, tmp_path / "checkpoints" / "run-x" / "checkpoint-2", data, 2, seed=6)
    here = [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    parameters = dict(scheduled["parameters"], directory=str(tmp_path / "checkpoints"), out_root=str(tmp_path / "runs"),
                      config=small_config(data, stories260k, tmp_path / "scores").model_dump(mode="json"))
    for deployment, update in ((scheduled, {"parameters": parameters, "pull_steps": here}), (gpu, {"pull_steps": here})):
        response = httpx.patch(f"{api}/deployments/{deployment['id']}", json=update, timeout=10)
        assert response.status_code == 204, response.text

    run_env = dict(deploy_env, PYTHONPATH=str(ROOT))
    announce = "import sys\nfrom pathlib import Path\nfrom dpo_eval.flows.train import announce\nannounce(Path(sys.argv[1]))\n"
    emitted = subprocess.run([sys.executable, "-c", announce, str(folder)], env=run_env, cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert emitted.returncode == 0, emitted.stderr[-3000:]
    (tick,) = wait_for(lambda: runs_of(api, scheduled, "AUTOMATION"), 90, "the watcher tick started by the event")
    assert tick["parameters"]["deployment"] == "evaluate-checkpoint/gpu"
    assert tick["parameters"]["directory"] == str(tmp_path / "checkpoints")
    assert runs_of(api, gpu) == []  # the event starts a tick, never an evaluation

    log = open(tmp_path / "tick.log", "w")
    ticking = subprocess.Popen([str(prefect), "flow-run", "execute", tick["id"]], env=run_env, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        evaluation = wait_for(lambda: runs_of(api, gpu), 180, "the evaluation the tick starts")[0]
        executed = subprocess.run([str(prefect), "flow-run", "execute", evaluation["id"]], env=run_env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=600)
        assert executed.returncode == 0, executed.stdout[-3000:] + executed.stderr[-3000:]
        wait_for(lambda: ticking.poll() is not None or len(runs_of(api, gpu)) > 1, 180, "the end of the tick")
    finally:
        stop(ticking)
        log.close()
    ticked = httpx.get(f"{api}/flow_runs/{tick['id']}", timeout=10).json()
    assert ticked["state"]["type"] == "COMPLETED", (tmp_path / "tick.log").read_text()[-3000:]
    evaluations = runs_of(api, gpu)  # exactly one evaluation, of this checkpoint, completed
    assert [(r["parameters"]["config"]["model"]["adapter"], r["state"]["type"]) for r in evaluations] == [
        (str(folder), "COMPLETED")]
    (entry,) = json.loads((tmp_path / "runs" / "evaluated.json").read_text())["checkpoints"].values()
    assert entry["status"] == "done" and entry["flow_run"] == evaluations[0]["id"] and entry["checkpoint"] == str(folder)
    assert json.loads((Path(entry["run"]) / "summary.json").read_text())["n_pairs"]


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


@pytest.fixture
def restarting(on_server, served_flows):
    """The crash automation of deployments/automations.py on evaluate-crashing/crashing, for one test; the API."""
    sys.path.insert(0, str(ROOT / "deployments"))
    from automations import crash_restart_automation

    automation = crash_restart_automation(served_flows["crashing"]["id"], "evaluate-crashing/crashing").create()
    try:
        yield on_server
    finally:
        automation.delete()


def runs_into(api: str, deployment: dict, run_dir: str | Path) -> list[dict]:
    """The runs of `deployment` that evaluate into `run_dir`."""
    return [r for r in runs_of(api, deployment) if r["parameters"]["config"]["out"] == str(run_dir)]


def crash_world(stories: Path, tmp_path: Path, max_restarts: int):
    """A complete checkpoint under tmp_path/ckpt, its data set and the watcher's settings: (checkpoint, config)."""
    from dpo_eval.data.demo import write_demo_dataset
    from tests.test_watch import make_checkpoint, small_config

    data = write_demo_dataset(tmp_path / "pairs.jsonl", n=16)
    folder = make_checkpoint(stories, tmp_path / "ckpt" / "checkpoint-2", data, 2, seed=7)
    return folder, small_config(data, stories, tmp_path / "scores").model_copy(update={"max_restarts": max_restarts})


def test_watcher_waits_through_a_crash_that_the_automation_restarts(restarting, served_flows, stories260k, tmp_path):
    """The watcher and the crash automation together: the evaluation's run crashes (its worker dies), the
    automation reschedules it and it completes. The tick waits for that same run instead of counting the crash
    as a failed attempt (which made the next tick start a second evaluation into the same folder while the first
    resumed). Out of restarts, a crash is a failed attempt."""
    from dpo_eval.flows.watch import watch_checkpoints

    api, crashing = restarting, served_flows["crashing"]
    folder, config = crash_world(stories260k, tmp_path, max_restarts=1)

    def tick(config, out):
        return watch_checkpoints(str(tmp_path / "ckpt"), config, out_root=str(out),
                                 deployment="evaluate-crashing/crashing")

    assert tick(config, tmp_path / "evals") == [str(folder)]
    assert tick(config, tmp_path / "evals") == []
    (entry,) = json.loads((tmp_path / "evals" / "evaluated.json").read_text())["checkpoints"].values()
    assert entry["status"] == "done" and entry["attempts"] == 1
    (run,) = runs_into(api, crashing, entry["run"])  # one evaluation wrote the folder: crashed, then resumed
    assert run["id"] == entry["flow_run"] and run["state"]["type"] == "COMPLETED" and run["run_count"] == 2
    assert (Path(entry["run"]) / "starts.txt").read_text() == "1\n2\n"
    history = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
    assert [s["type"] for s in history].count("CRASHED") == 1
    assert any(s["type"] == "SCHEDULED" and "after a crash" in (s["message"] or "") for s in history)

    # max_restarts=0: the first crash ends the attempt (the automation's restart then fails at the cap)
    with pytest.raises(RuntimeError, match="attempt 1 of 3"):
        tick(config.model_copy(update={"max_restarts": 0}), tmp_path / "capped")
    (entry,) = json.loads((tmp_path / "capped" / "evaluated.json").read_text())["checkpoints"].values()
    assert entry["status"] == "failed" and entry["attempts"] == 1
    assert "out of restarts" in entry["error"] or "max_restarts=0" in entry["error"], entry["error"]
    assert [r["id"] for r in runs_into(api, crashing, entry["run"])] == [entry["flow_run"]]


def test_watcher_never_starts_a_second_evaluation_while_a_crashed_run_resumes(restarting, served_flows, stories260k,
                                                                              tmp_path):
    """A tick counted a crashed run's attempt as failed (the earlier watcher did at once; this one does after
    `crash_grace_s` without a reschedule), and the automation has restarted that run since: the next tick waits
    for it, and starts no second evaluation into its folder."""
    from prefect.deployments import run_deployment

    from dpo_eval.flows.watch import checkpoint_key, run_folder_name, watch_checkpoints

    api, crashing = restarting, served_flows["crashing"]
    folder, config = crash_world(stories260k, tmp_path, max_restarts=1)
    out, hold = tmp_path / "evals", Path(config.dataset.source).with_suffix(".hold")
    spec = config.model.model_copy(update={"adapter": str(folder)})
    key = checkpoint_key(spec)
    run_dir = out / run_folder_name(folder, key)
    starts, ticked = run_dir / "starts.txt", []

    def taken():
        return json.loads((out / "evaluated.json").read_text())["checkpoints"][key]["status"] == "running"

    hold.touch()  # the restarted run waits until the test lets it finish
    try:
        first = run_deployment("evaluate-crashing/crashing", timeout=0, parameters={
            "config": config.model_copy(update={"model": spec, "out": run_dir}).model_dump(mode="json")})
        wait_for(lambda: starts.is_file() and starts.read_text() == "1\n2\n", 120, "the crash, restart and start 2")
        state = {"checkpoints": {key: {"checkpoint": str(folder), "run": str(run_dir), "status": "failed",
                                       "attempts": 1, "flow_run": str(first.id), "error": "Crashed: the worker died"}}}
        (out / "evaluated.json").write_text(json.dumps(state))
        thread = context_thread(lambda: ticked.append(watch_checkpoints(
            str(tmp_path / "ckpt"), config, out_root=str(out), deployment="evaluate-crashing/crashing")))
        wait_for(taken, 120, "the tick to take up the checkpoint")
    finally:
        hold.unlink()
    thread.join(timeout=300)
    assert ticked == [[str(folder)]]
    runs = runs_into(api, crashing, run_dir)  # the restarted run only, completed: no second evaluation
    assert [(r["id"], r["state"]["type"]) for r in runs] == [(str(first.id), "COMPLETED")]
    assert starts.read_text() == "1\n2\n"
    entry = json.loads((out / "evaluated.json").read_text())["checkpoints"][key]
    assert entry["status"] == "done" and entry["attempts"] == 1 and entry["flow_run"] == str(first.id)


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
