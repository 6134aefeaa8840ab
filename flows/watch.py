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
- one tick at a time: a lock file beside the state file (and the deployment's concurrency limit).
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from dpo_eval.flows.evaluate import evaluate_checkpoint
from prefect import flow, get_run_logger

from dpo_eval.checkpoint_meta import METADATA, read_metadata
from dpo_eval.config import EvalConfig, ModelSpec
from dpo_eval.generation.models import fingerprints
from dpo_eval.identity import model_identity
from dpo_eval.jsonsafe import json_key
from dpo_eval.studies.trend import checkpoint_step, write_trend

STATE = "evaluated.json"
LOCK = ".watch.lock"
MAX_PASSES = 100  # rescans within one tick, for checkpoints saved while it evaluated others


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


def _evaluate(run_config: EvalConfig, deployment: str | None, key: str, attempt: int, label: str):
    """Run one evaluation; (completed?, state description, flow run id)."""
    if deployment:
        from prefect.deployments import run_deployment

        parameters = {"config": run_config.model_dump(mode="json")}
        child = run_deployment(deployment, parameters=parameters, timeout=None, flow_run_name=label,
                               idempotency_key=_idempotency_key(key, parameters, attempt))
        state, run_id = child.state, str(child.id)
    else:
        state = evaluate_checkpoint.with_options(flow_run_name=label)(run_config, return_state=True)
        run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    completed = state is not None and state.is_completed()
    message = f"{state.name}: {state.message or ''}".strip() if state is not None else "no state"
    return completed, message, run_id


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(directory: str, config: EvalConfig, out_root: str | None = None,
                      deployment: str | None = None, max_attempts: int = 3,
                      foreign_adapters: bool = False) -> list[str]:
    """Evaluate each complete checkpoint under `directory` not evaluated yet; returns those evaluated now.

    With `deployment` ("evaluate-checkpoint/NAME"), each evaluation is a run of that deployment (a GPU
    work pool); otherwise a subflow in this process. The tick fails when an evaluation failed (it is
    retried on the next tick, up to `max_attempts` attempts).
    """
    logger = get_run_logger()
    root = Path(out_root) if out_root else Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / LOCK) as held:
        if not held:
            logger.warning("another watch-checkpoints tick is running on %s: this one does nothing", root)
            return []
        return _tick(Path(directory), config, root, deployment, max_attempts, foreign_adapters, logger)


def _tick(directory: Path, config: EvalConfig, root: Path, deployment: str | None, max_attempts: int,
          foreign_adapters: bool, logger) -> list[str]:
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
            attempts = entry["attempts"] if entry else 0
            if not (entry and entry["status"] == "running" and deployment):
                attempts += 1  # a new attempt; a tick that died waiting on a deployment run re-attaches to it
            run_dir = Path(entry["run"]) if entry else root / run_folder_name(folder, key)
            entry = entries[key] = {"checkpoint": str(folder), "run": str(run_dir), "status": "running",
                                    "attempts": attempts, "started": datetime.now(timezone.utc).isoformat()}
            _save_state(state_path, state)
            logger.info("evaluating %s (attempt %d of %d) into %s", folder, attempts, max_attempts, run_dir)
            run_config = config.model_copy(update={"model": spec, "out": run_dir})
            completed, message, run_id = _evaluate(run_config, deployment, key, attempts,
                                                   f"{run_dir.name}-attempt-{attempts}")
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
        write_trend(runs, root)
    if failed:
        raise RuntimeError("evaluations failed (retried on the next tick, up to max_attempts): " + "; ".join(failed))
    return evaluated
