"""The `dpo-eval` command. Errors go to stderr, no traceback unless --debug."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from dpo_eval.errors import DpoEvalError

app = typer.Typer(
    name="dpo-eval",
    help="Did the DPO alignment take? Compare a tuned checkpoint with its base, feature by feature.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DatasetOpt = typer.Option(..., "--dataset", help="File, save_to_disk folder or hub id of the preference data.")
FormatOpt = typer.Option("auto", "--format", help="auto|orca|openai|hh-rlhf|trl")
ColumnsOpt = typer.Option(None, "--columns", help="Explicit mapping, e.g. prompt=instruction,chosen=good,rejected=bad")
SeedOpt = typer.Option(42, "--seed", help="Seed of the hash-based train/valid split.")
ValidOpt = typer.Option(0.1, "--valid-fraction", help="Share of pairs in the valid split.")
LimitOpt = typer.Option(None, "--limit", help="Keep only the first N pairs.")


def dataset_spec(dataset: str, fmt: str, columns: Optional[str], seed: int, valid_fraction: float,
                 limit: Optional[int]):
    """A DatasetSpec from CLI options; bad values become a DpoEvalError naming the option."""
    from dpo_eval.config import DatasetSpec, parse_columns

    try:
        return DatasetSpec(source=dataset, format=fmt, columns=parse_columns(columns), seed=seed,
                           valid_fraction=valid_fraction, limit=limit)
    except (ValidationError, ValueError) as exc:
        raise DpoEvalError(_validation_message(exc)) from None


def _validation_message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"--{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                         for e in exc.errors())
    return str(exc)


@app.callback()
def _root() -> None:
    """Did the DPO alignment take? Compare a tuned checkpoint with its base, feature by feature."""


@app.command()
def pairs(
    dataset: str = DatasetOpt,
    fmt: str = FormatOpt,
    columns: Optional[str] = ColumnsOpt,
    seed: int = SeedOpt,
    valid_fraction: float = ValidOpt,
    limit: Optional[int] = LimitOpt,
    out: Path = typer.Option(..., "--out", help="Where to write pairs.parquet."),
) -> None:
    """Read preference data into the pairs table; print a JSON summary of what was kept."""
    from dpo_eval.data import read_pairs

    table, report = read_pairs(dataset_spec(dataset, fmt, columns, seed, valid_fraction, limit))
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out)
    print(json.dumps(report.to_dict(), indent=2))


def model_spec(base: str, adapter: Optional[str], quantization: str, compute_dtype: str,
               prompt_template: Optional[str]):
    """A ModelSpec from CLI options; bad values become a DpoEvalError naming the option."""
    from dpo_eval.config import ModelSpec

    try:
        return ModelSpec(base=base, adapter=adapter, quantization=quantization, compute_dtype=compute_dtype,
                         prompt_template=prompt_template)
    except ValidationError as exc:
        raise DpoEvalError(_validation_message(exc)) from None


@app.command()
def generate(
    base: str = typer.Option(..., "--base", help="Base model folder or hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA/QLoRA adapter folder or hub id."),
    dataset: str = DatasetOpt,
    fmt: str = FormatOpt,
    columns: Optional[str] = ColumnsOpt,
    limit: Optional[int] = LimitOpt,
    quantization: str = typer.Option("4bit", "--quantization", help="none|8bit|4bit (nf4, double quant)."),
    compute_dtype: str = typer.Option("bfloat16", "--compute-dtype", help="bfloat16|float16|float32"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template",
                                                  help="Jinja template taking system and prompt."),
    out: Path = typer.Option(..., "--out", help="Where to write answers.parquet."),
) -> None:
    """Generate base (and, with an adapter, tuned) answers to every prompt."""
    import polars as pl

    from dpo_eval.config import GenerationSpec
    from dpo_eval.data import load_pairs
    from dpo_eval.generation import generate_both
    from dpo_eval.models import load_model

    spec = model_spec(base, adapter, quantization, compute_dtype, prompt_template)
    try:
        gen = GenerationSpec(max_new_tokens=max_new_tokens, batch_size=batch_size)
    except ValidationError as exc:
        raise DpoEvalError(_validation_message(exc)) from None
    pairs_table = load_pairs(dataset_spec(dataset, fmt, columns, 42, 0.1, limit))
    loaded = load_model(spec)
    answers = generate_both(loaded, pairs_table, gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers.write_parquet(out)
    print(json.dumps({"answers": answers.height, "models": sorted(set(answers["model"])),
                      "fingerprint": loaded.fingerprint, "base_fingerprint": loaded.base_fingerprint,
                      "truncated_prompts": int(answers.filter(pl.col("model") == "base")["truncated"].sum()),
                      "repairs": loaded.repairs}, indent=2))


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


@app.command()
def diagnose(
    base: str = typer.Option(..., "--base", help="Base model folder or hub id."),
    adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA/QLoRA adapter folder or hub id."),
    dataset: str = DatasetOpt,
    limit: int = typer.Option(8, "--limit", help="Pairs used for the logit comparisons."),
    out: Path = typer.Option(..., "--out", help="Folder for diagnostics.json and diagnostics.html."),
) -> None:
    """Quantization, merge and tokenizer diagnostics: pass/warn/fail with numbers."""
    from dpo_eval.data import load_pairs
    from dpo_eval.diagnostics import diagnose as run_diagnose

    spec = model_spec(base, adapter, "4bit", "bfloat16", None)
    checks = run_diagnose(spec, load_pairs(dataset_spec(dataset, "auto", None, 42, 0.1, limit)), out)
    for check in checks:
        print(f"[{check.status:4s}] {check.name}: {check.explanation}")
    print(f"diagnostics: {out / 'diagnostics.json'}")


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


@app.command()
def analyze(
    features: Path = typer.Option(..., "--features", help="features.parquet (pair_id, split, role, features)."),
    out: Path = typer.Option(..., "--out", help="Folder for stats.*, summary.json, report.html, plots/."),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level for the q-values."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Bootstrap resamples for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutations."),
) -> None:
    """Paired statistics and the report from a features table."""
    import polars as pl

    from dpo_eval.analysis import AnalysisSpec, run_analysis
    from dpo_eval.report import write_outputs

    if not features.is_file():
        raise DpoEvalError(f"--features {features}: no such file")
    try:
        spec = AnalysisSpec(alpha=alpha, bootstrap=bootstrap, seed=seed)
    except ValidationError as exc:
        raise DpoEvalError(_validation_message(exc)) from None
    try:
        table = pl.read_parquet(features)
    except Exception as exc:
        raise DpoEvalError(f"--features {features}: cannot read as parquet ({exc})") from None
    result = run_analysis(table, spec)
    summary = write_outputs(result.stats, result.summary, out)
    print("\n".join(summary["sentences"]))
    print(f"report: {out / 'report.html'}")


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        app(args=args, prog_name="dpo-eval")  # click handles usage errors and --help itself
    except DpoEvalError as exc:
        if debug:
            raise
        print(f"dpo-eval: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
