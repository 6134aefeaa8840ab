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


import dpo_eval.cli_flows  # noqa: E402,F401  (registers the flow commands on `app`)


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
    # `python -m dpo_eval.cli`: run the importable module, whose `app` has the flow commands registered
    from dpo_eval.cli import main as _main

    _main()
