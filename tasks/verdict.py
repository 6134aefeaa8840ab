"""The four answers of a finished run (dpo_eval.studies.verdict) as a Prefect task: no cache (it reads the run
folder, which the stages before it just wrote), no retries (a pure computation)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dpo_eval.studies.verdict import write_verdict


@task(name="verdict", cache_policy=NO_CACHE)
def verdict_task(run_dir: Path) -> dict:
    """summary.json's `verdict` and `gap` from everything the run wrote; the report re-rendered. Returns the summary."""
    return write_verdict(run_dir)
