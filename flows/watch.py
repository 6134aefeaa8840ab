"""Re-evaluate every new checkpoint: find adapter folders, evaluate each one once, plot the trend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, get_run_logger

from dpo_eval.config import EvalConfig
from dpo_eval.models import fingerprints
from dpo_eval.trend import checkpoint_step, write_trend
from flows.evaluate import evaluate_checkpoint

STATE = "evaluated.json"


def find_checkpoints(directory: Path) -> list[Path]:
    """Folders with an adapter_config.json (trl's checkpoint-N among them), in training-step order."""
    steps = {p.parent: checkpoint_step(p.parent) for p in Path(directory).rglob("adapter_config.json")}
    return sorted(steps, key=lambda p: (steps[p] is None, steps[p] or 0, str(p)))


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(directory: str, config: EvalConfig, out_root: str | None = None,
                      deployment: str | None = None) -> list[str]:
    """Evaluate each checkpoint under `directory` not evaluated yet (remembered in out_root/evaluated.json).

    With `deployment` ("evaluate-checkpoint/NAME"), each evaluation is a run of that deployment
    (a GPU work pool); otherwise a subflow in this process.
    """
    logger = get_run_logger()
    root = Path(out_root) if out_root else Path(config.out)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    started = []
    for folder in find_checkpoints(Path(directory)):
        spec = config.model.model_copy(update={"adapter": str(folder)})
        key = fingerprints(spec)[1]
        if key in state:
            continue
        run_dir = root / folder.name
        run_config = config.model_copy(update={"model": spec, "out": run_dir})
        logger.info("evaluating new checkpoint %s", folder)
        if deployment:
            from prefect.deployments import run_deployment

            run_deployment(deployment, parameters={"config": run_config.model_dump(mode="json")}, timeout=None)
        else:
            evaluate_checkpoint(run_config)
        state[key] = {"checkpoint": str(folder), "run": str(run_dir)}
        _save_state(state_path, state)
        started.append(str(folder))
    runs = [Path(v["run"]) for v in state.values() if (Path(v["run"]) / "summary.json").is_file()]
    if runs:
        write_trend(runs, root)
    return started
