"""The `forgetting-check` flow: did the tuned model forget? lm-evaluation-harness tasks on the tuned model
and its base, paired per question, alone (without generating or scoring anything)."""

from __future__ import annotations

from pathlib import Path

from dpo_eval.tasks.evaluation import release_models_task
from dpo_eval.tasks.forgetting import compare_benchmarks_task, report_forgetting_task
from prefect import flow
from prefect.artifacts import create_markdown_artifact

from dpo_eval.config import ModelSpec
from dpo_eval.forgetting.harness import ForgettingSpec, raise_failures
from dpo_eval.report.forgetting import forgetting_markdown


@flow(name="forgetting-check", log_prints=True)
def forgetting_check(model: ModelSpec, forgetting: ForgettingSpec, out: Path) -> dict:
    """Benchmark accuracy of tuned vs base per task and metric (delta with a paired CI, exact McNemar p, BH q)
    into out/forgetting.parquet, forgetting.json and the report's section. A task that could not run fails
    the flow run after the others' results, the report and the artifact are written. Returns the result."""
    out = Path(out)
    result = compare_benchmarks_task(model, forgetting, out)
    release_models_task()
    if result["tasks"]:
        report_forgetting_task(out, result)
    create_markdown_artifact(forgetting_markdown(result), key="dpo-eval-forgetting",
                             description="dpo-eval: did it forget?")
    raise_failures(result, out)
    return result
