"""Evaluate every new checkpoint exactly once, and plot the trend.

This watcher is the one path that evaluates checkpoints: the cron schedule and the checkpoint event
(deployments/prefect.yaml) both start a tick of it. It remembers each checkpoint in OUT_ROOT/evaluated.json:

- the key is the checkpoint's identity (`checkpoint_key`), so a tick never evaluates a checkpoint twice,
  and a rewritten adapter at the same path is a new checkpoint;
- a checkpoint is evaluated once it is complete: its dpo-eval training metadata written (trl writes the
  adapter first). An adapter trained elsewhere never gets metadata: it is skipped, or with
  `foreign_adapters=True` evaluated once its adapter files are unchanged since the previous tick;
- a failed evaluation is not recorded as done: the next tick retries it, up to `max_attempts` attempts
  (counted in the state file; delete the entry to try again after that);
- each checkpoint gets its own run folder, `<folder name>-<hash of its resolved path and identity>`;
- with `deployment`, each evaluation is a run of that deployment with an idempotency key from the
  checkpoint, its settings and the attempt: a tick that dies while waiting re-attaches to the same run;
- a Crashed run is not finished while the crash automation (deployments/automations.py) may restart it:
  the tick waits until it ends otherwise, is out of restarts (flows/restarts.py), or stays Crashed for
  `crash_grace_s`; a run counted as failed that was rescheduled since is waited for, never run twice;
- one tick at a time: a lock file beside the state file (and the deployment's concurrency limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dpo_eval.flows.evaluate import evaluate_checkpoint
from dpo_eval.flows.restarts import restarts_left
from prefect import flow, get_run_logger

from dpo_eval.checkpoint_meta import METADATA, read_metadata
from dpo_eval.config import EvalConfig, ModelSpec
from dpo_eval.generation.models import fingerprints
from dpo_eval.identity import model_identity
from dpo_eval.jsonsafe import json_key
from dpo_eval.studies.trend import (
    checkpoint_step,
    collect,
    leaderboard_rows,
    recommend,
    recommendation_line,
    write_trend,
)

STATE = "evaluated.json"
LOCK = ".watch.lock"
MAX_PASSES = 100  # rescans within one tick, for checkpoints saved while it evaluated others
CRASH_GRACE_S = 300.0  # how long a crashed run with restarts left may wait for the automation to reschedule it
POLL_S = 2.0  # seconds between two reads of a deployment run's state


def checkpoint_key(spec: ModelSpec) -> str:
    """The identity of a checkpoint's files (base, adapter, reference adapter, loading; not the library versions):
    the key of evaluated.json, the run folder and the idempotency key. The one place that decides when a
    checkpoint counts as already evaluated: after `pip install -U peft` a checkpoint is still evaluated."""
    return model_identity(spec).files_key


def earlier_key(spec: ModelSpec) -> str:
    """The key evaluated.json used before (the full tuned key, library versions included), to carry its entries."""
    return fingerprints(spec)[1]


def find_checkpoints(directory: Path) -> list[Path]:
    """Folders with an adapter_config.json (trl's checkpoint-N among them), in training-step order."""
    steps = {p.parent: checkpoint_step(p.parent) for p in Path(directory).rglob("adapter_config.json")}
    return sorted(steps, key=lambda p: (steps[p] is None, steps[p] or 0, str(p)))


def run_folder_name(folder: Path, key: str) -> str:
    """`<name>-<hash>`: two `checkpoint-20` folders of different training runs, or one path whose adapter
    was rewritten, never share a run folder."""
    digest = hashlib.sha256(f"{Path(folder).resolve()}\n{key}".encode()).hexdigest()[:10]
    return f"{Path(folder).name}-{digest}"


def adapter_signature(folder: Path) -> list[list]:
    """Name, size and mtime of adapter_config.json and adapter_model.*: what 'unchanged' means."""
    files = sorted([folder / "adapter_config.json", *folder.glob("adapter_model.*")])
    return [[f.name, st.st_size, st.st_mtime_ns] for f in files if f.is_file() for st in [f.stat()]]


def incomplete(folder: Path, unsettled: dict, foreign_adapters: bool) -> str | None:
    """Why `folder` is not ready for evaluation this tick, or None when it is.

    `unsettled` (path -> adapter signature at the previous tick) is updated for foreign adapters."""
    signature = adapter_signature(folder)
    if not any(name.startswith("adapter_model.") for name, *_ in signature):
        return "no adapter_model.* yet"
    try:
        metadata = read_metadata(folder)
    except (OSError, ValueError):
        return f"{METADATA} is being written"
    if metadata:
        unsettled.pop(str(folder), None)
        return None
    if not foreign_adapters:
        return (f"no {METADATA} yet (trl writes the adapter before dpo-eval writes the metadata); an adapter "
                "trained outside dpo-eval never gets one: pass foreign_adapters=True to evaluate it")
    previous, unsettled[str(folder)] = unsettled.get(str(folder)), signature
    if previous != signature:
        return "adapter without training metadata, new or changed since the last tick: evaluated once unchanged"
    return None


def _load_state(path: Path) -> dict:
    state = json.loads(path.read_text()) if path.is_file() else {}
    if "checkpoints" not in state:  # the first format: key -> {checkpoint, run}, every entry done
        state = {"checkpoints": {k: v | {"status": "done", "attempts": 1} for k, v in state.items()}}
    state.setdefault("unsettled", {})
    state.setdefault("waiting", {})
    return state


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


@contextmanager
def _exclusive(path: Path):
    """True when this process holds the lock file (released on exit, also when the process dies)."""
    import fcntl

    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _idempotency_key(key: str, parameters: dict, attempt: int) -> str:
    settings = json_key(parameters, 16, default=str)
    return f"dpo-eval-watch:{key}:{settings}:attempt-{attempt}"


def _start_run(deployment: str, run_config: EvalConfig, key: str, attempt: int, label: str) -> str:
    """Create (or, by its idempotency key, find) the deployment run of one attempt; its flow run id."""
    from prefect.deployments import run_deployment

    parameters = {"config": run_config.model_dump(mode="json")}
    child = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=label,
                           idempotency_key=_idempotency_key(key, parameters, attempt))
    return str(child.id)


def run_state(run_id: str):
    """The current state of a flow run; None when the API does not know the run (deleted)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_flow_run(run_id).state
        except ObjectNotFound:
            return None


def wait_for_run(run_id: str, max_restarts: int, crash_grace_s: float = CRASH_GRACE_S):
    """Wait for a deployment run through its crashes: (the flow run, why a Crashed one counts as finished).

    `run_deployment` returns at Crashed, but the crash automation puts a crashed run back to Scheduled and it
    resumes into the same run folder. A Crashed run is finished only once it is out of restarts (started
    `max_restarts + 1` times: the next start fails at the cap) or after `crash_grace_s` seconds Crashed
    without being rescheduled (no automation); any other final state (Completed, Failed, Cancelled) is."""
    from prefect.client.orchestration import get_client

    crash = None  # (id of the Crashed state, when this wait first saw it)
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            state = run.state
            if state is not None and state.is_crashed():
                if crash is None or crash[0] != state.id:
                    crash = (state.id, time.monotonic())
                if restarts_left(max_restarts, run.run_count) <= 0:
                    return run, "out of restarts"
                if time.monotonic() - crash[1] >= crash_grace_s:
                    return run, f"not rescheduled within {crash_grace_s:g} s"
            elif state is not None and state.is_final():
                return run, ""
            time.sleep(POLL_S)


def _outcome(state, why: str = "") -> tuple[bool, str]:
    """(completed?, state description) of a finished evaluation."""
    if state is None:
        return False, "no state"
    message = f"{state.name}: {state.message or ''}".strip() + (f" ({why})" if why else "")
    return state.is_completed(), message


def _evaluate_here(run_config: EvalConfig, label: str):
    """Run one evaluation as a subflow of this tick; (completed?, state description, flow run id)."""
    state = evaluate_checkpoint.with_options(flow_run_name=label)(run_config, return_state=True)
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    return *_outcome(state), run_id


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(directory: str, config: EvalConfig, out_root: str | None = None,
                      deployment: str | None = None, max_attempts: int = 3,
                      foreign_adapters: bool = False, crash_grace_s: float = CRASH_GRACE_S) -> list[str]:
    """Evaluate each complete checkpoint under `directory` not evaluated yet; returns those evaluated now.

    With `deployment` ("evaluate-checkpoint/NAME"), each evaluation is a run of that deployment (a GPU
    work pool); otherwise a subflow in this process. The tick fails when an evaluation failed (it is
    retried on the next tick, up to `max_attempts` attempts). A crashed deployment run is waited for while
    the crash automation may restart it: until out of restarts, or `crash_grace_s` seconds not rescheduled.
    """
    logger = get_run_logger()
    root = Path(out_root) if out_root else Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / LOCK) as held:
        if not held:
            logger.warning("another watch-checkpoints tick is running on %s: this one does nothing", root)
            return []
        return _tick(Path(directory), config, root, deployment, max_attempts, foreign_adapters, crash_grace_s,
                     logger)


def leaderboard_key(training_run: Path) -> str:
    """`dpo-eval-leaderboard-<run>`: the training run's folder name as a Prefect artifact key (lowercase letters,
    digits, dashes) and a short hash of its resolved path, so two runs of one name keep two leaderboards."""
    slug = re.sub(r"[^a-z0-9]+", "-", training_run.name.lower()).strip("-") or "run"
    digest = hashlib.sha256(str(training_run.resolve()).encode()).hexdigest()[:6]
    return f"dpo-eval-leaderboard-{slug}-{digest}"


def publish_leaderboards(entries: dict, rule: str) -> dict[str, dict]:
    """One table artifact per training run (the folder holding its checkpoints), newest checkpoint first, with the
    checkpoint to ship above it; a new version of the same key after each evaluation. Returns {key: recommended}."""
    from prefect.artifacts import create_table_artifact

    groups: dict[Path, list[Path]] = {}
    for entry in entries.values():
        if entry["status"] == "done" and (Path(entry["run"]) / "summary.json").is_file():
            groups.setdefault(Path(entry["checkpoint"]).parent, []).append(Path(entry["run"]))
    published = {}
    for training_run, runs in sorted(groups.items()):
        table = collect(runs)
        recommended = recommend(table, rule)
        key = leaderboard_key(training_run)
        create_table_artifact(leaderboard_rows(table), key=key, description=(
            f"**{training_run}**: {recommendation_line({'recommended': recommended})}"))
        published[key] = recommended
    return published


def resumable(entry: dict | None, deployment: str | None) -> bool:
    """Whether a checkpoint's last attempt may still be under way, so a tick waits for it instead of starting
    another: a tick died waiting on it (`running`), or it was counted as failed while Crashed and the crash
    automation has rescheduled it since (its run is not final)."""
    if not (deployment and entry):
        return False
    if entry["status"] == "running":
        return True
    state = run_state(entry["flow_run"]) if entry["status"] == "failed" and entry.get("flow_run") else None
    return state is not None and not state.is_final()


def _tick(directory: Path, config: EvalConfig, root: Path, deployment: str | None, max_attempts: int,
          foreign_adapters: bool, crash_grace_s: float, logger) -> list[str]:
    state_path = root / STATE
    state = _load_state(state_path)
    entries = state["checkpoints"]
    evaluated, failed, seen = [], [], set()
    state["waiting"] = {}  # folder -> why it is not evaluated this tick (also logged)
    for _ in range(MAX_PASSES):
        new = [f for f in find_checkpoints(directory) if str(f) not in seen]
        if not new:
            break
        for folder in new:
            seen.add(str(folder))
            reason = incomplete(folder, state["unsettled"], foreign_adapters)
            if reason:
                logger.info("not evaluating %s this tick: %s", folder, reason)
                state["waiting"][str(folder)] = reason
                _save_state(state_path, state)
                continue
            spec = config.model.model_copy(update={"adapter": str(folder)})
            key = checkpoint_key(spec)
            if key not in entries and (old := earlier_key(spec)) in entries:  # a state file of the earlier format
                entries[key] = entries.pop(old)
            entry = entries.get(key)
            if entry and entry["status"] == "done":
                if entry["checkpoint"] != str(folder):
                    logger.info("%s is the same checkpoint as %s, evaluated in %s", folder, entry["checkpoint"],
                                entry["run"])
                continue
            if entry and entry["status"] == "gave-up":
                logger.warning("%s failed %d times (last: %s); not retried (delete its entry in %s to retry)",
                               folder, entry["attempts"], entry.get("error"), state_path)
                continue
            resume = resumable(entry, deployment)  # re-attach to the run of the last attempt
            attempts = (entry["attempts"] if entry else 0) + (0 if resume else 1)
            run_id = entry.get("flow_run") if resume else None
            run_dir = Path(entry["run"]) if entry else root / run_folder_name(folder, key)
            entry = entries[key] = {"checkpoint": str(folder), "run": str(run_dir), "status": "running",
                                    "attempts": attempts, "started": datetime.now(timezone.utc).isoformat(),
                                    "flow_run": run_id}
            _save_state(state_path, state)
            logger.info("evaluating %s (attempt %d of %d%s) into %s", folder, attempts, max_attempts,
                        f", waiting for its run {run_id}" if run_id else "", run_dir)
            run_config = config.model_copy(update={"model": spec, "out": run_dir})
            label = f"{run_dir.name}-attempt-{attempts}"
            if deployment:
                if run_id is None or run_state(run_id) is None:  # a new attempt, or a run not recorded or deleted
                    entry["flow_run"] = run_id = _start_run(deployment, run_config, key, attempts, label)
                    _save_state(state_path, state)
                run, why = wait_for_run(run_id, run_config.max_restarts, crash_grace_s)
                completed, message = _outcome(run.state, why)
            else:
                completed, message, run_id = _evaluate_here(run_config, label)
            entry.update(flow_run=run_id, finished=datetime.now(timezone.utc).isoformat())
            if completed:
                entry["status"] = "done"
                evaluated.append(str(folder))
            else:
                entry.update(status="gave-up" if attempts >= max_attempts else "failed", error=message)
                failed.append(f"{folder} (attempt {attempts} of {max_attempts}: {message})")
                logger.error("evaluation of %s failed: %s", folder, message)
            _save_state(state_path, state)
    runs = [Path(e["run"]) for e in entries.values()
            if e["status"] == "done" and (Path(e["run"]) / "summary.json").is_file()]
    if runs:
        write_trend(runs, root, rule=config.verdict.recommend)
        publish_leaderboards(entries, config.verdict.recommend)
    if failed:
        raise RuntimeError("evaluations failed (retried on the next tick, up to max_attempts): " + "; ".join(failed))
    return evaluated
