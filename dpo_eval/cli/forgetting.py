"""`dpo-eval forgetting`: did it forget? lm-evaluation-harness tasks on the tuned model and its base, paired
per question (dpo_eval.forgetting.harness), without Prefect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpo_eval.cli.options import (
    BaseOpt,
    DtypeOpt,
    QuantOpt,
    ReferenceAdapterOpt,
    build,
    field_help,
    model_spec,
    spec_option,
)
from dpo_eval.forgetting.harness import ForgettingSpec

FLAGS = {"tasks": "--tasks", "include_path": "--include-path", "limit": "--limit", "num_fewshot": "--num-fewshot",
         "batch_size": "--batch-size"}


def _option(name: str):
    return spec_option(ForgettingSpec, name, FLAGS[name])


def forgetting(
    base: str = BaseOpt,
    adapter: str = typer.Option(..., "--adapter", help="The DPO (LoRA/QLoRA) adapter: folder or hub id."),
    reference_adapter: Optional[str] = ReferenceAdapterOpt,
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated. " + field_help(ForgettingSpec, "tasks")),
    include_path: Optional[Path] = _option("include_path"),
    limit: Optional[int] = _option("limit"),
    num_fewshot: Optional[int] = _option("num_fewshot"),
    batch_size: int = _option("batch_size"),
    quantization: str = QuantOpt,
    compute_dtype: str = DtypeOpt,
    out: Path = typer.Option(..., "--out", help="Where to write forgetting.parquet, forgetting.json and the "
                             "report's section (a run directory of `dpo-eval evaluate` gets it in its report)."),
) -> None:
    """Run lm-evaluation-harness tasks on the base (adapter disabled, or base + the reference adapter) and the
    tuned model from one load and compare them per question: accuracies, the paired difference with its CI,
    the exact McNemar p and BH q across tasks. Writes forgetting.parquet and forgetting.json; prints the
    per-task block. A task that cannot run is one line on stderr (exit 2) after the others' results are
    written."""
    from dpo_eval.forgetting.harness import jsonable, raise_failures, run_forgetting, write_forgetting
    from dpo_eval.generation.models import check_paths
    from dpo_eval.report.forgetting import write_forgetting_report

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    spec = build(ForgettingSpec, FLAGS, tasks=names, include_path=str(include_path) if include_path else None,
                 limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    model = model_spec(base=base, adapter=adapter, reference_adapter=reference_adapter, quantization=quantization,
                       compute_dtype=compute_dtype)
    check_paths(model)
    pairs, result = run_forgetting(model, spec)
    write_forgetting(out, pairs, result)
    if result["tasks"]:
        write_forgetting_report(out, result)
    print(json.dumps(jsonable(result["tasks"]), indent=2))
    raise_failures(result, out)
