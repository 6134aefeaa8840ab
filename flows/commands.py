"""The commands of `dpo-eval` that run Prefect flows: evaluate, demo, train, serve (registered in flows/cli.py).

Each checks its inputs first (dpo_eval.preflight) and imports Prefect and flows/ only after, so a user
mistake costs no server start and prints one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.training import TrainSpec
from dpo_eval_cli.options import BaseOpt, ColumnsOpt, DatasetOpt, LimitOpt, build, field_help, override_option, \
    spec_option, validation_message

# evaluate's options: the EvalConfig field each one sets, and its flag.
EVALUATE_FLAGS = {
    "dataset": "--dataset", "dataset.source": "--dataset", "dataset.format": "--format", "dataset.seed": "--seed",
    "dataset.columns": "--columns", "dataset.valid_fraction": "--valid-fraction", "dataset.limit": "--limit",
    "model": "--base", "model.base": "--base", "model.adapter": "--adapter", "model.quantization": "--quantization",
    "model.compute_dtype": "--compute-dtype", "model.prompt_template": "--prompt-template",
    "generation.max_new_tokens": "--max-new-tokens", "generation.batch_size": "--batch-size",
    "generation.engine": "--engine", "generation.merge": "--merge",
    "scoring.cache_dir": "--cache-dir", "analysis.alpha": "--alpha", "analysis.bootstrap": "--bootstrap",
    "shard_size": "--shard-size", "out": "--out", "reference_dataset": "--reference-dataset",
    "reference_dataset.source": "--reference-dataset",
}


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = tree.setdefault(key, {})
        if not isinstance(node, dict):
            raise DpoEvalError(f"--config: {key} must be a mapping of its fields, not {node!r}")
        tree = node
    tree[leaf] = value


def evaluate_config(config: Optional[Path], options: dict[str, object],
                    flags: dict[str, str] = EVALUATE_FLAGS) -> EvalConfig:
    """The EvalConfig of --config (if any) with the given options (dotted field -> value) laid over it;
    an invalid one names the option (`flags`) or the --config field at fault."""
    from dpo_eval.preflight import read_config_file

    tree = read_config_file(config) if config else {}
    given = {dotted for dotted, value in options.items() if value is not None}
    for dotted in given:
        _set(tree, dotted, options[dotted])
    try:
        return EvalConfig.model_validate(tree)
    except ValidationError as exc:
        raise DpoEvalError(validation_message(exc, flags, given, config)) from exc


def evaluate(
    base: Optional[str] = override_option(ModelSpec, "base", "--base"),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="The DPO adapter (checkpoint) to evaluate: "
                                          "a folder or hub id (required, here or in --config)."),
    dataset: Optional[str] = override_option(DatasetSpec, "source", "--dataset"),
    reference_dataset: Optional[str] = typer.Option(
        None, "--reference-dataset", help="For questions without labels (prompt or question only): the preference "
        "data the checkpoint was trained on, whose chosen - rejected gives the direction and the scale."),
    out: Optional[Path] = override_option(EvalConfig, "out", "--out"),
    config: Optional[Path] = typer.Option(None, "--config", help="EvalConfig as YAML; options override it."),
    fmt: Optional[str] = override_option(DatasetSpec, "format", "--format"),
    columns: Optional[str] = ColumnsOpt,
    seed: Optional[int] = override_option(DatasetSpec, "seed", "--seed"),
    valid_fraction: Optional[float] = override_option(DatasetSpec, "valid_fraction", "--valid-fraction"),
    limit: Optional[int] = override_option(DatasetSpec, "limit", "--limit"),
    quantization: Optional[str] = override_option(ModelSpec, "quantization", "--quantization"),
    compute_dtype: Optional[str] = override_option(ModelSpec, "compute_dtype", "--compute-dtype"),
    prompt_template: Optional[str] = override_option(ModelSpec, "prompt_template", "--prompt-template"),
    max_new_tokens: Optional[int] = override_option(GenerationSpec, "max_new_tokens", "--max-new-tokens"),
    batch_size: Optional[int] = override_option(GenerationSpec, "batch_size", "--batch-size"),
    engine: Optional[str] = override_option(GenerationSpec, "engine", "--engine"),
    merge: Optional[bool] = typer.Option(None, "--merge/--no-merge", help=field_help(GenerationSpec, "merge")
                                         + " Default: False.", show_default=False),
    shard_size: Optional[int] = override_option(EvalConfig, "shard_size", "--shard-size"),
    cache_dir: Optional[Path] = override_option(ScoringSpec, "cache_dir", "--cache-dir"),
    alpha: Optional[float] = override_option(AnalysisSpec, "alpha", "--alpha"),
    bootstrap: Optional[int] = override_option(AnalysisSpec, "bootstrap", "--bootstrap"),
) -> None:
    """Evaluate a checkpoint end to end as a Prefect flow (ephemeral local server, no set-up)."""
    from dpo_eval.config import parse_columns
    from dpo_eval.preflight import check_evaluation

    try:
        mapping = parse_columns(columns) or None
    except ValueError as exc:
        raise DpoEvalError(str(exc)) from exc
    eval_config = evaluate_config(config, {
        "dataset.source": dataset, "dataset.format": fmt, "dataset.seed": seed,
        "dataset.valid_fraction": valid_fraction, "dataset.limit": limit, "dataset.columns": mapping,
        "model.base": base, "model.adapter": adapter, "model.quantization": quantization,
        "model.compute_dtype": compute_dtype, "model.prompt_template": prompt_template,
        "generation.max_new_tokens": max_new_tokens, "generation.batch_size": batch_size,
        "generation.engine": engine, "generation.merge": merge,
        "scoring.cache_dir": str(cache_dir) if cache_dir else None, "analysis.alpha": alpha,
        "analysis.bootstrap": bootstrap, "shard_size": shard_size, "out": str(out) if out else None,
        "reference_dataset.source": reference_dataset})
    check_evaluation(eval_config)
    from flows.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(eval_config)
    print("\n".join(summary["sentences"]))
    print(json.dumps({"cache": summary["cache"], "timings": summary["timings"]}))
    print(f"report: {eval_config.out / 'report.html'}")


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _default_base() -> str:
    return os.environ.get("DPO_EVAL_DEMO_BASE") or str(Path(__file__).resolve().parents[2] / "shared/models/stories260k")


def demo(
    out: Optional[Path] = typer.Option(None, "--out", help="Demo folder (report at OUT/report.html); "
                                       "default: the demo flow's (runs/demo)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model; default ../shared/models/stories260k "
                                       "beside the project (or DPO_EVAL_DEMO_BASE)."),
    pairs_n: Optional[int] = typer.Option(None, "--pairs", help="Preference pairs to write; default: the demo flow's."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DPO training steps; default: the demo flow's."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps; default: the "
                                             "demo flow's."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of the LoRA weights; default: the demo flow's."),
) -> None:
    """The offline demo: write preferences, train a QLoRA DPO adapter, evaluate every checkpoint, report."""
    base = base or _default_base()
    if not Path(base).is_dir():
        raise DpoEvalError(f"demo base model {base} not found: the demo uses the tiny real model in "
                           "../shared/models/stories260k (pass --base or set DPO_EVAL_DEMO_BASE)")
    _quiet_prefect()
    from flows.demo import demo as demo_flow

    given = {"out": str(out) if out else None, "pairs": pairs_n, "steps": steps, "save_every": save_every,
             "learning_rate": lr}
    demo_flow(base=base, **{name: value for name, value in given.items() if value is not None})


TRAIN_FLAGS = {"base": "--base", "dataset.source": "--dataset", "dataset.limit": "--limit", "out": "--out",
               "steps": "--steps", "save_every": "--save-every", "beta": "--beta", "learning_rate": "--lr",
               "batch_size": "--batch-size", "quantization": "--quantization"}


def train(
    base: str = BaseOpt,
    dataset: str = DatasetOpt,
    out: Path = typer.Option(..., "--out", help=TrainSpec.model_fields["out"].description),
    steps: int = spec_option(TrainSpec, "steps", "--steps"),
    save_every: int = spec_option(TrainSpec, "save_every", "--save-every"),
    beta: float = spec_option(TrainSpec, "beta", "--beta"),
    lr: float = spec_option(TrainSpec, "learning_rate", "--lr"),
    batch_size: int = spec_option(TrainSpec, "batch_size", "--batch-size"),
    quantization: str = spec_option(TrainSpec, "quantization", "--quantization"),
    limit: Optional[int] = LimitOpt,
) -> None:
    """DPO training of a (Q)LoRA adapter with trl, as the Prefect flow train-dpo."""
    from dpo_eval.preflight import check_dataset, check_model

    data = build(DatasetSpec, {"source": "--dataset", "limit": "--limit"}, source=dataset, limit=limit)
    spec = build(TrainSpec, TRAIN_FLAGS, base=base, dataset=data, out=out, steps=steps, save_every=save_every,
                 beta=beta, learning_rate=lr, batch_size=batch_size, quantization=quantization)
    check_model(ModelSpec(base=base))
    check_dataset(data)
    _quiet_prefect()
    from flows.train import train_dpo_flow

    for folder in train_dpo_flow(spec):
        print(folder)


def serve(
    config: Optional[Path] = typer.Option(None, "--config", help="EvalConfig YAML: default parameters."),
    checkpoints: Optional[str] = typer.Option(None, "--checkpoints", help="Folder the scheduled watcher scans."),
    out_root: Path = typer.Option(Path("runs"), "--out-root", help="Where the watcher writes evaluations."),
    cron: str = typer.Option("*/30 * * * *", "--cron", help="Schedule of the watcher."),
) -> None:
    """Serve evaluate-checkpoint (and a scheduled watch-checkpoints) on this machine, no work pools."""
    params = {}
    if config:
        params = {"config": evaluate_config(config, {}, flags={}).model_dump(mode="json")}
    if checkpoints and not params:
        raise DpoEvalError("--checkpoints needs --config (the evaluation settings of each checkpoint)")
    os.environ.setdefault("PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "reschedule")
    from prefect import serve as prefect_serve
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.evaluate import evaluate_checkpoint
    from flows.watch import watch_checkpoints

    deployments = [evaluate_checkpoint.to_deployment(name="local", parameters=params)]
    if checkpoints:
        deployments.append(watch_checkpoints.to_deployment(
            name="scheduled", cron=cron, parameters={"directory": checkpoints, "out_root": str(out_root)} | params,
            # one watcher tick at a time (its lock file makes overlapping ticks safe; this skips them)
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)))
    prefect_serve(*deployments)
