"""The commands of `dpo-eval` that run Prefect flows: evaluate, demo, train, serve (registered in dpo_eval/cli/main.py).

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

from dpo_eval.cli.options import (
    BaseOpt,
    ColumnsOpt,
    LimitOpt,
    build,
    field_help,
    override_option,
    spec_option,
    validation_message,
)
from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.training.dpo import TrainSpec

# evaluate's options: the EvalConfig field each one sets, and its flag.
EVALUATE_FLAGS = {
    "dataset": "--dataset", "dataset.source": "--dataset", "dataset.format": "--format", "dataset.seed": "--seed",
    "dataset.columns": "--columns", "dataset.valid_fraction": "--valid-fraction", "dataset.limit": "--limit",
    "dataset.category_field": "--category-field", "model": "--base", "model.base": "--base", "model.adapter": "--adapter", "model.quantization": "--quantization",
    "model.reference_adapter": "--reference-adapter",
    "model.compute_dtype": "--compute-dtype", "model.prompt_template": "--prompt-template",
    "generation.max_new_tokens": "--max-new-tokens", "generation.batch_size": "--batch-size",
    "generation.engine": "--engine", "generation.merge": "--merge",
    "scoring.cache_dir": "--cache-dir", "analysis.alpha": "--alpha", "analysis.bootstrap": "--bootstrap",
    "shard_size": "--shard-size", "out": "--out", "reference_dataset": "--reference-dataset",
    "reference_dataset.source": "--reference-dataset", "quantization_study": "--quantization",
    **{f"quantization_study.{i}": "--quantization" for i in range(3)}, "generation_runner": "--generation-runner",
    "scoring_runner": "--scoring-runner", "worker_lease_s": "--worker-lease",
    "worker_stall_s": "--worker-stall",
}
REPEAT_HELP = " Repeat it for several data sets (e.g. each one a mixed training run used): results per data set too."
QUANT_HELP = (" A comma-separated list (e.g. 4bit,8bit,none) runs a quantization study: the first setting is the main "
              "run, each other one a sub-run in OUT/quantization/<setting>/ compared with it (quantization.json).")


def parse_quantizations(text: str | None) -> tuple[str | None, tuple[str, ...] | None]:
    """--quantization 4bit[,8bit,none]: (the main run's setting, the study's other settings or None)."""
    if text is None:
        return None, None
    settings = [part.strip() for part in text.split(",")]
    twice = sorted({s for s in settings if settings.count(s) > 1})
    if twice or "" in settings:
        raise DpoEvalError(f"--quantization {text}: " + (f"{twice[0]} is given twice" if twice else "an empty setting")
                           + "; list each setting once, the main run's first (e.g. 4bit,8bit,none)")
    return settings[0], (tuple(settings[1:]) if len(settings) > 1 else None)


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
    reference_adapter: Optional[str] = override_option(ModelSpec, "reference_adapter", "--reference-adapter"),
    dataset: Optional[list[str]] = typer.Option(None, "--dataset", metavar="DATA", help=DatasetSpec.model_fields["source"].description
                                                + REPEAT_HELP, show_default=False),
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
    category_field: Optional[str] = override_option(DatasetSpec, "category_field", "--category-field"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help=ModelSpec.model_fields["quantization"]
                                               .description + " One of: none|8bit|4bit. Default: 4bit." + QUANT_HELP,
                                               show_default=False),
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
    generation_runner: Optional[str] = override_option(EvalConfig, "generation_runner", "--generation-runner"),
    scoring_runner: Optional[str] = override_option(EvalConfig, "scoring_runner", "--scoring-runner"),
    worker_lease: Optional[float] = override_option(EvalConfig, "worker_lease_s", "--worker-lease"),
    worker_stall: Optional[float] = override_option(EvalConfig, "worker_stall_s", "--worker-stall"),
) -> None:
    """Evaluate a checkpoint end to end as a Prefect flow (ephemeral local server, no set-up)."""
    from dpo_eval.config import parse_columns
    from dpo_eval.preflight import check_evaluation

    try:
        mapping = parse_columns(columns) or None
    except ValueError as exc:
        raise DpoEvalError(str(exc)) from exc
    main_quantization, study = parse_quantizations(quantization)
    eval_config = evaluate_config(config, {
        "dataset.source": dataset[0] if dataset else None, "dataset.format": fmt, "dataset.seed": seed,
        "dataset.valid_fraction": valid_fraction, "dataset.limit": limit, "dataset.columns": mapping,
        "dataset.category_field": category_field,
        "model.base": base, "model.adapter": adapter, "model.reference_adapter": reference_adapter,
        "model.quantization": main_quantization, "quantization_study": study,
        "model.compute_dtype": compute_dtype, "model.prompt_template": prompt_template,
        "generation.max_new_tokens": max_new_tokens, "generation.batch_size": batch_size,
        "generation.engine": engine, "generation.merge": merge,
        "scoring.cache_dir": str(cache_dir) if cache_dir else None, "analysis.alpha": alpha,
        "analysis.bootstrap": bootstrap, "shard_size": shard_size, "out": str(out) if out else None,
        "reference_dataset.source": reference_dataset, "generation_runner": generation_runner,
        "scoring_runner": scoring_runner, "worker_lease_s": worker_lease,
        "worker_stall_s": worker_stall})
    if dataset and len(dataset) > 1:  # --format, --columns, --limit and the split options apply to each
        eval_config = eval_config.model_copy(update={"extra_datasets": tuple(
            eval_config.dataset.model_copy(update={"source": source}) for source in dataset[1:])})
    check_evaluation(eval_config)
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(eval_config)
    print("\n".join(summary["sentences"]))
    print(json.dumps({"cache": summary["cache"], "timings": summary["timings"]}))
    print(f"report: {eval_config.out / 'report.html'}")
    from dpo_eval.studies.verdict import verdict_lines

    print("\n".join(verdict_lines(summary)))


def _quiet_prefect() -> None:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


DEMO_MODEL = Path("shared/models/stories260k")


def _default_base() -> str:
    """DPO_EVAL_DEMO_BASE, else ../shared/models/stories260k beside the working folder or beside the checkout that
    holds this file (the first that exists; the working folder's when neither does, for the error message)."""
    if os.environ.get("DPO_EVAL_DEMO_BASE"):
        return os.environ["DPO_EVAL_DEMO_BASE"]
    here = Path(__file__).resolve()
    candidates = [Path.cwd().resolve().parent / DEMO_MODEL,
                  *(folder.parent / DEMO_MODEL for folder in here.parents if (folder / "pyproject.toml").is_file())]
    return str(next((path for path in candidates if path.is_dir()), candidates[0]))


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
    from dpo_eval.flows.demo import demo as demo_flow

    given = {"out": str(out) if out else None, "pairs": pairs_n, "steps": steps, "save_every": save_every,
             "learning_rate": lr}
    demo_flow(base=base, **{name: value for name, value in given.items() if value is not None})


TRAIN_FLAGS = {"base": "--base", "dataset.source": "--dataset", "dataset.limit": "--limit", "out": "--out",
               "weights": "--weights", **{f"weights.{i}": "--weights" for i in range(16)},
               "steps": "--steps", "save_every": "--save-every", "beta": "--beta", "learning_rate": "--lr",
               "batch_size": "--batch-size", "quantization": "--quantization", "sft_adapter": "--sft-adapter"}


def train(
    base: str = BaseOpt,
    dataset: list[str] = typer.Option(..., "--dataset", metavar="DATA", help=DatasetSpec.model_fields["source"].description
                                      + " Repeat it to train on a mix of data sets (see --weights)."),
    out: Path = typer.Option(..., "--out", help=TrainSpec.model_fields["out"].description),
    steps: int = spec_option(TrainSpec, "steps", "--steps"),
    save_every: int = spec_option(TrainSpec, "save_every", "--save-every"),
    beta: float = spec_option(TrainSpec, "beta", "--beta"),
    lr: float = spec_option(TrainSpec, "learning_rate", "--lr"),
    batch_size: int = spec_option(TrainSpec, "batch_size", "--batch-size"),
    quantization: str = spec_option(TrainSpec, "quantization", "--quantization"),
    limit: Optional[int] = LimitOpt,
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated share of each --dataset in the "
                                          "training mix, in order (e.g. 0.5,0.5; normalised to sum 1): drawn "
                                          "without replacement with the training seed, as many pairs as the "
                                          "scarcest data set allows. Default: every train pair of every data set."),
    sft_adapter: Optional[str] = spec_option(TrainSpec, "sft_adapter", "--sft-adapter"),
) -> None:
    """DPO training of a (Q)LoRA adapter with trl, as the Prefect flow train-dpo."""
    from dpo_eval.data.mixing import mix_train, read_sources
    from dpo_eval.preflight import check_dataset, check_model
    from dpo_eval.training.dpo import check_sft_adapter

    data = [build(DatasetSpec, {"source": "--dataset", "limit": "--limit"}, source=d, limit=limit) for d in dataset]
    spec = build(TrainSpec, TRAIN_FLAGS, base=base, dataset=data[0], extra_datasets=tuple(data[1:]), out=out,
                 steps=steps, save_every=save_every, beta=beta, learning_rate=lr, batch_size=batch_size,
                 quantization=quantization, weights=parse_weights(weights), sft_adapter=sft_adapter)
    check_model(ModelSpec(base=base))
    check_sft_adapter(spec)
    for one in data:
        check_dataset(one)
    mix_train(read_sources(data)[0], spec.weights, spec.seed)  # a bad mix fails here, before any flow starts
    _quiet_prefect()
    from dpo_eval.flows.train import train_dpo_flow

    for folder in train_dpo_flow(spec):
        print(folder)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """--weights 0.5,0.5 as numbers; None where not given."""
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise DpoEvalError(f"--weights {text}: comma-separated numbers, one per --dataset (e.g. 0.5,0.5)") from None


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

    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from dpo_eval.flows.watch import watch_checkpoints

    deployments = [evaluate_checkpoint.to_deployment(name="local", parameters=params)]
    if checkpoints:
        deployments.append(watch_checkpoints.to_deployment(
            name="scheduled", cron=cron, parameters={"directory": checkpoints, "out_root": str(out_root)} | params,
            # one watcher tick at a time (its lock file makes overlapping ticks safe; this skips them)
            concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)))
    prefect_serve(*deployments)


def worker(limit: int = typer.Option(1, "--limit", min=1, help="Shards this worker runs at once (one GPU: 1)."),
           ) -> None:
    """Run a dpo-eval task worker: generation and scoring shards of evaluations with generation_runner (or
    scoring_runner) task-workers, from the Prefect API in PREFECT_API_URL; results in the shared result storage
    (PREFECT_RESULTS_LOCAL_STORAGE_PATH on a shared volume, or PREFECT_DEFAULT_RESULT_STORAGE_BLOCK)."""
    from dpo_eval.flows.task_workers import serve_shards

    serve_shards(limit)
