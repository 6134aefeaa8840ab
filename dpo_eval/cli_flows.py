"""The `dpo-eval` commands that run Prefect flows: evaluate, train, demo, trend, serve.

Prefect and the flows are imported inside each command, so `import dpo_eval` stays Prefect-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from dpo_eval.cli import ColumnsOpt, DatasetOpt, LimitOpt, _validation_message, app
from dpo_eval.errors import DpoEvalError


def _set(tree: dict, dotted: str, value) -> None:
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


@app.command()
def evaluate(
    base: Optional[str] = typer.Option(None, "--base", help="Base model folder or hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="The DPO adapter (checkpoint) to evaluate."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Preference data (file, folder or hub id)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory."),
    config: Optional[Path] = typer.Option(None, "--config", help="EvalConfig as YAML; options override it."),
    fmt: Optional[str] = typer.Option(None, "--format"),
    columns: Optional[str] = ColumnsOpt,
    seed: Optional[int] = typer.Option(None, "--seed"),
    valid_fraction: Optional[float] = typer.Option(None, "--valid-fraction"),
    limit: Optional[int] = LimitOpt,
    quantization: Optional[str] = typer.Option(None, "--quantization", help="none|8bit|4bit"),
    compute_dtype: Optional[str] = typer.Option(None, "--compute-dtype"),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Prompts per generation shard."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Score cache folder."),
    alpha: Optional[float] = typer.Option(None, "--alpha"),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap"),
) -> None:
    """Evaluate a checkpoint end to end as a Prefect flow (ephemeral local server, no set-up)."""
    import yaml

    from dpo_eval.config import EvalConfig, parse_columns

    tree = yaml.safe_load(config.read_text()) if config else {}
    if config and not isinstance(tree, dict):
        raise DpoEvalError(f"--config {config}: expected a YAML mapping of EvalConfig fields")
    for key, value in {"dataset.source": dataset, "dataset.format": fmt, "dataset.seed": seed,
                       "dataset.valid_fraction": valid_fraction, "dataset.limit": limit,
                       "dataset.columns": parse_columns(columns) or None, "model.base": base,
                       "model.adapter": adapter, "model.quantization": quantization,
                       "model.compute_dtype": compute_dtype, "model.prompt_template": prompt_template,
                       "generation.max_new_tokens": max_new_tokens, "generation.batch_size": batch_size,
                       "scoring.cache_dir": str(cache_dir) if cache_dir else None, "analysis.alpha": alpha,
                       "analysis.bootstrap": bootstrap, "shard_size": shard_size,
                       "out": str(out) if out else None}.items():
        _set(tree, key, value)
    try:
        eval_config = EvalConfig.model_validate(tree)
    except ValidationError as exc:
        raise DpoEvalError(_validation_message(exc)) from None
    from flows.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(eval_config)
    print("\n".join(summary["sentences"]))
    print(json.dumps({"cache": summary["cache"], "timings": summary["timings"]}))
    print(f"report: {eval_config.out / 'report.html'}")


def _quiet_prefect() -> None:
    import os

    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _default_base() -> str:
    import os

    return os.environ.get("DPO_EVAL_DEMO_BASE") or str(Path(__file__).resolve().parents[2] / "shared/models/stories260k")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo folder (report at OUT/report.html)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default ../shared/models/stories260k."),
    pairs_n: int = typer.Option(400, "--pairs", help="Preference pairs to write."),
    steps: int = typer.Option(60, "--steps", help="DPO training steps."),
    save_every: int = typer.Option(20, "--save-every", help="Checkpoint every N steps."),
    lr: float = typer.Option(2e-4, "--lr", help="Learning rate of the LoRA weights."),
) -> None:
    """The offline demo: write preferences, train a QLoRA DPO adapter, evaluate every checkpoint, report."""
    _quiet_prefect()
    base = base or _default_base()
    if not Path(base).is_dir():
        raise DpoEvalError(f"demo base model {base} not found: the demo uses the tiny real model in "
                           "../shared/models/stories260k (pass --base or set DPO_EVAL_DEMO_BASE)")
    from flows.demo import demo as demo_flow

    demo_flow(out=str(out), base=base, pairs=pairs_n, steps=steps, save_every=save_every, learning_rate=lr)


@app.command()
def train(
    base: str = typer.Option(..., "--base", help="Base model folder or hub id."),
    dataset: str = DatasetOpt,
    out: Path = typer.Option(..., "--out", help="Folder for checkpoint-N adapters."),
    steps: int = typer.Option(40, "--steps"),
    save_every: int = typer.Option(20, "--save-every"),
    beta: float = typer.Option(0.1, "--beta"),
    lr: float = typer.Option(5e-4, "--lr"),
    batch_size: int = typer.Option(4, "--batch-size"),
    quantization: str = typer.Option("4bit", "--quantization", help="none|4bit (QLoRA)."),
    limit: Optional[int] = LimitOpt,
) -> None:
    """DPO training of a (Q)LoRA adapter with trl, as the Prefect flow train-dpo."""
    from dpo_eval.config import DatasetSpec
    from dpo_eval.training import TrainSpec

    _quiet_prefect()
    try:
        spec = TrainSpec(base=base, dataset=DatasetSpec(source=dataset, limit=limit), out=out, steps=steps,
                         save_every=save_every, beta=beta, learning_rate=lr, batch_size=batch_size,
                         quantization=quantization)
    except ValidationError as exc:
        raise DpoEvalError(_validation_message(exc)) from None
    from flows.train import train_dpo_flow

    for folder in train_dpo_flow(spec):
        print(folder)


@app.command()
def trend(
    runs: list[Path] = typer.Argument(..., help="Run directories of evaluated checkpoints."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for trend.csv, trend.json, trend.png."),
    split: str = typer.Option("valid", "--split"),
) -> None:
    """Evaluation curves across checkpoints: sign agreement, significant features, reward accuracy."""
    from dpo_eval.trend import write_trend

    table = write_trend(runs, out, split)
    print(table.drop("run", "adapter"))
    print(f"trend: {out / 'trend.png'}")


@app.command()
def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="EvalConfig YAML: default parameters."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Folder the scheduled watcher scans."),
    out_root: Path = typer.Option(Path("runs"), "--out-root", help="Where the watcher writes evaluations."),
    cron: str = typer.Option("*/30 * * * *", "--cron", help="Schedule of the watcher."),
) -> None:
    """Serve evaluate-checkpoint (and a scheduled watch-checkpoints) on this machine, no work pools."""
    import os

    import yaml

    from dpo_eval.config import EvalConfig

    os.environ.setdefault("PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "reschedule")
    params = {}
    if config:
        try:
            params = {"config": EvalConfig.model_validate(yaml.safe_load(config.read_text())).model_dump(mode="json")}
        except ValidationError as exc:
            raise DpoEvalError(f"--config {config}: " + _validation_message(exc)) from None
    from prefect import serve as prefect_serve

    from flows.evaluate import evaluate_checkpoint
    from flows.watch import watch_checkpoints

    deployments = [evaluate_checkpoint.to_deployment(name="local", parameters=params)]
    if checkpoints:
        if not params:
            raise DpoEvalError("--checkpoints needs --config (the evaluation settings of each checkpoint)")
        deployments.append(watch_checkpoints.to_deployment(
            name="scheduled", cron=cron, parameters={"directory": checkpoints, "out_root": str(out_root)} | params))
    prefect_serve(*deployments)
