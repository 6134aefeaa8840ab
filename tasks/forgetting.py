"""Thin Prefect tasks over the forgetting check (dpo_eval.forgetting.harness, dpo_eval.report.forgetting).

No Prefect-level cache: the core caches each side's per-question results by model identity, task config,
limit and few-shot count, so a rerun for a new checkpoint evaluates the tuned side only. A retry after an
out-of-memory error halves lm-eval's batch.
"""

from __future__ import annotations

from pathlib import Path

from dpo_eval.tasks.evaluation import _is_oom, batch_for_attempt, oom_halvings
from prefect import task
from prefect.cache_policies import NO_CACHE

from dpo_eval import stages
from dpo_eval.config import ModelSpec
from dpo_eval.forgetting.harness import ForgettingSpec


@task(name="compare-benchmarks", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_is_oom)
def compare_benchmarks_task(model: ModelSpec, spec: ForgettingSpec, out: Path) -> dict:
    """lm-eval tasks on base and tuned from one load, paired per question: forgetting.parquet and
    forgetting.json in `out`; returns the result."""
    from dpo_eval.forgetting.harness import run_forgetting, write_forgetting

    with oom_halvings() as halvings:  # half the batch per out-of-memory failure, not per retry
        if halvings:
            stages.release_models()
            spec = spec.model_copy(update={"batch_size": batch_for_attempt(spec.batch_size, halvings)})
        pairs, result = run_forgetting(model, spec, load=stages.cached_model)
    write_forgetting(out, pairs, result)
    return result


@task(name="report-forgetting", cache_policy=NO_CACHE)
def report_forgetting_task(out: Path, result: dict) -> Path:
    """The forgetting section (and its plot) in out's report; returns report.html."""
    from dpo_eval.report.forgetting import write_forgetting_report

    return write_forgetting_report(out, result)
