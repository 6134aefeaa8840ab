"""The commands that run dpo_eval directly, without Prefect: pairs, generate, diagnose, analyze, trend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpo_eval.cli.options import (
    AdapterOpt,
    BaseOpt,
    CategoryOpt,
    ColumnsOpt,
    DatasetOpt,
    DtypeOpt,
    FormatOpt,
    LimitOpt,
    QuantOpt,
    ReferenceAdapterOpt,
    SeedOpt,
    TemplateOpt,
    ValidOpt,
    build,
    dataset_spec,
    field_help,
    model_spec,
    spec_option,
)
from dpo_eval.config import AnalysisSpec, GenerationSpec, ServerSpec
from dpo_eval.errors import DpoEvalError


def pairs(
    dataset: str = DatasetOpt,
    fmt: str = FormatOpt,
    columns: Optional[str] = ColumnsOpt,
    seed: int = SeedOpt,
    valid_fraction: float = ValidOpt,
    limit: Optional[int] = LimitOpt,
    category_field: Optional[str] = CategoryOpt,
    out: Path = typer.Option(..., "--out", help="Where to write pairs.parquet."),
) -> None:
    """Read preference data into the pairs table; print a JSON summary of what was kept."""
    from dpo_eval.data.pairs import read_pairs

    spec = dataset_spec(dataset, fmt, columns, seed=seed, valid_fraction=valid_fraction, limit=limit,
                        category_field=category_field)
    table, report = read_pairs(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(out)
    print(json.dumps(report.to_dict(), indent=2))


def generate(
    base: str = BaseOpt,
    adapter: Optional[str] = AdapterOpt,
    reference_adapter: Optional[str] = ReferenceAdapterOpt,
    dataset: str = DatasetOpt,
    fmt: str = FormatOpt,
    columns: Optional[str] = ColumnsOpt,
    limit: Optional[int] = LimitOpt,
    category_field: Optional[str] = CategoryOpt,
    quantization: str = QuantOpt,
    compute_dtype: str = DtypeOpt,
    max_new_tokens: int = spec_option(GenerationSpec, "max_new_tokens", "--max-new-tokens"),
    batch_size: Optional[int] = spec_option(GenerationSpec, "batch_size", "--batch-size"),
    engine: str = spec_option(GenerationSpec, "engine", "--engine"),
    merge: bool = typer.Option(False, "--merge/--no-merge", help=field_help(GenerationSpec, "merge")),
    prompt_template: Optional[str] = TemplateOpt,
    base_url: Optional[str] = typer.Option(None, "--base-url", help=field_help(ServerSpec, "base_url")),
    served_base: Optional[str] = typer.Option(None, "--served-base", help=field_help(ServerSpec, "served_base")),
    served_tuned: Optional[str] = typer.Option(None, "--served-tuned", help=field_help(ServerSpec, "served_tuned")),
    api_key_env: str = spec_option(ServerSpec, "api_key_env", "--api-key-env"),
    concurrency: int = spec_option(ServerSpec, "concurrency", "--concurrency"),
    max_retries: int = spec_option(ServerSpec, "max_retries", "--max-retries"),
    timeout_s: float = spec_option(ServerSpec, "timeout_s", "--timeout"),
    out: Path = typer.Option(..., "--out", help="Where to write answers.parquet."),
) -> None:
    """Generate base (and, with an adapter, tuned) answers to every prompt; 'base' is base + the reference
    adapter where there is one. --engine openai: from a server you run (--base-url, --served-base, --served-tuned)."""
    spec = model_spec(base=base, adapter=adapter, reference_adapter=reference_adapter, quantization=quantization,
                      compute_dtype=compute_dtype, prompt_template=prompt_template)
    server = served_server(engine, base_url=base_url, served_base=served_base, served_tuned=served_tuned,
                           api_key_env=api_key_env, concurrency=concurrency, max_retries=max_retries,
                           timeout_s=timeout_s)
    gen = build(GenerationSpec, {"max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size",
                                 "engine": "--engine", "merge": "--merge"},
                max_new_tokens=max_new_tokens, batch_size=batch_size, engine=engine, merge=merge, server=server)
    data = dataset_spec(dataset, fmt, columns, limit=limit, category_field=category_field)
    if server is not None:
        return _generate_served(spec, gen, data, out)
    from dpo_eval.preflight import check_model

    check_model(spec)
    import polars as pl

    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.generation.models import load_model
    from dpo_eval.reference import reference_label

    pairs_table = load_pairs(data)
    loaded = load_model(spec, engine=gen.engine, merge=gen.merge)
    answers = _generate_with_progress(loaded, pairs_table, gen)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers.write_parquet(out)
    print(json.dumps({"answers": answers.height, "models": sorted(set(answers["model"])),
                      "fingerprint": loaded.fingerprint, "base_fingerprint": loaded.base_fingerprint,
                      "base_side": reference_label(spec), "engine": gen.engine, "merge": gen.merge,
                      "truncated_prompts": int(answers.filter(pl.col("model") == "base")["truncated"].sum()),
                      "repairs": loaded.repairs}, indent=2))


SERVER_FLAGS = {"base_url": "--base-url", "served_base": "--served-base", "served_tuned": "--served-tuned",
                "api_key_env": "--api-key-env", "concurrency": "--concurrency", "max_retries": "--max-retries",
                "timeout_s": "--timeout"}


def served_server(engine: str, **values) -> ServerSpec | None:
    """The ServerSpec of --engine openai (a DpoEvalError naming each missing option); None for the other engines,
    which take none of the server options."""
    if engine != "openai":
        given = [SERVER_FLAGS[name] for name in ("base_url", "served_base", "served_tuned") if values[name]]
        if given:
            raise DpoEvalError(f"{', '.join(given)} need --engine openai (generation through a server you run)")
        return None
    missing = [SERVER_FLAGS[name] for name in ("base_url", "served_base", "served_tuned") if not values[name]]
    if missing:
        raise DpoEvalError(f"--engine openai needs {', '.join(missing)}: the server's URL and the names it serves "
                           "the base and base + adapter under (vLLM: the model it was started with, and the NAME of "
                           "--lora-modules NAME=ADAPTER)")
    return build(ServerSpec, SERVER_FLAGS, **values)


def _generate_served(spec, gen: GenerationSpec, data, out: Path) -> None:
    """`generate` through the server of --engine openai: no model is loaded here, only the base's tokenizer."""
    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.generation.openai_engine import generate_served, normalised_url

    from dpo_eval.generation.turns import has_second_turn

    pairs = load_pairs(data)
    if has_second_turn(pairs):  # turn 2 needs each model's own turn-1 answer in its prompt: not done by the server path
        raise DpoEvalError(f"--engine openai answers one turn only, and {data.source} is a two-turn data set (its "
                           "records have a second turn); generate it with an in-process engine (--engine hf, "
                           "dequantized, continuous or static), or give a single-turn data set")
    repairs: list[str] = []
    answers, account = generate_served(spec, gen, pairs, repairs=repairs)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers.write_parquet(out)
    print(json.dumps({"answers": answers.height, "models": sorted(set(answers["model"])), "engine": "openai",
                      "server": {"base_url": normalised_url(gen.server.base_url), "served_base": gen.server.served_base,
                                 "served_tuned": gen.server.served_tuned}, **account,
                      "truncated_prompts": int(answers.filter(answers["model"] == "base")["truncated"].sum()),
                      "repairs": repairs}, indent=2))


def diagnose(
    base: str = BaseOpt,
    adapter: Optional[str] = AdapterOpt,
    dataset: str = DatasetOpt,
    limit: int = typer.Option(8, "--limit", help="Pairs used for the logit comparisons."),
    out: Path = typer.Option(..., "--out", help="Folder for diagnostics.json and diagnostics.html."),
) -> None:
    """Quantization, merge and tokenizer diagnostics: pass/warn/fail with numbers."""
    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.preflight import check_model
    from dpo_eval.studies.diagnostics import diagnose as run_diagnose

    spec = model_spec(base=base, adapter=adapter)
    check_model(spec)
    checks = run_diagnose(spec, load_pairs(dataset_spec(dataset, limit=limit)), out)
    for check in checks:
        print(f"[{check.status:4s}] {check.name}: {check.explanation}")
    print(f"diagnostics: {out / 'diagnostics.json'}")


def analyze(
    features: Path = typer.Option(..., "--features", help="features.parquet (pair_id, split, role, features)."),
    out: Path = typer.Option(..., "--out", help="Folder for stats.*, summary.json, report.html, plots/."),
    alpha: float = spec_option(AnalysisSpec, "alpha", "--alpha"),
    bootstrap: int = spec_option(AnalysisSpec, "bootstrap", "--bootstrap"),
    seed: int = spec_option(AnalysisSpec, "seed", "--seed"),
) -> None:
    """Paired statistics and the report from a features table."""
    import polars as pl

    from dpo_eval.report.page import write_outputs
    from dpo_eval.stats.analysis import run_analysis

    if not features.is_file():
        raise DpoEvalError(f"--features {features}: no such file")
    spec = build(AnalysisSpec, {"alpha": "--alpha", "bootstrap": "--bootstrap", "seed": "--seed"},
                 alpha=alpha, bootstrap=bootstrap, seed=seed)
    try:
        table = pl.read_parquet(features)
    except Exception as exc:  # polars raises several types for unreadable files
        raise DpoEvalError(f"--features {features}: cannot read as parquet ({exc})") from exc
    result = run_analysis(table, spec)
    summary = write_outputs(result.stats, result.summary, out)
    print("\n".join(summary["sentences"]))
    print(f"report: {out / 'report.html'}")


def trend(
    runs: list[Path] = typer.Argument(..., help="Run directories of evaluated checkpoints."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for trend.csv, trend.json, trend.png."),
    split: str = typer.Option("valid", "--split", help="Split whose figures are plotted: train|valid."),
) -> None:
    """Evaluation curves across checkpoints: sign agreement, significant features, reward accuracy."""
    from dpo_eval.preflight import check_run_dir
    import polars as pl

    from dpo_eval.studies.trend import recommendation_line, write_trend

    for run in runs:
        check_run_dir(run)
    trend = write_trend(runs, out, split)
    print(pl.DataFrame(trend["checkpoints"]).select(
        "step", "alignment", "better", "forgetting", "gaming", "win_rate", "win_low", "win_high", "gap_closed",
        "largest_drop", "sign_agreement", "significant", "reward_accuracy"))
    print(f"trend: {out / 'trend.png'}")
    print(recommendation_line(trend))


def _generate_with_progress(loaded, pairs, gen):
    """generate_both with a bar on a terminal that advances after every batch."""
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.progress import StageProgress

    from dpo_eval.generation.turns import TURN2, generate_two_turns, has_second_turn

    models = 2 if loaded.has_adapter else 1
    later = int(pairs[TURN2].is_not_null().sum()) if has_second_turn(pairs) else 0  # a two-turn set: turn 2 too
    with StageProgress("generation", (pairs.height + later) * models, "answers") as progress:
        answers = generate_both(loaded, pairs, gen, on_batch=progress.advance)
        return generate_two_turns(loaded, pairs, answers, gen, progress.advance) if later else answers


def compare(
    a: str = typer.Argument(..., help="System A: a run directory (its tuned answers), RUN:tuned or RUN:base."),
    b: str = typer.Argument(..., help="System B, compared with A on the pairs both answered."),
    out: Path = typer.Option(..., "--out", help="Folder for features.parquet, stats.*, summary.json, report.html."),
) -> None:
    """A/B comparison of two runs on the same prompts: B - A beside A's chosen - rejected."""
    from dpo_eval.studies.compare import compare_runs

    summary = compare_runs(a, b, out)
    print(summary["compare"]["note"])
    print("\n".join(summary["sentences"]))
    print(f"report: {out / 'report.html'}")
