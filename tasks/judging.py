"""Thin Prefect tasks over the judges (dpo_eval.judges.pairwise, dpo_eval.judges.reward_model, dpo_eval.report.judge).

No Prefect-level cache: both judges cache by content themselves (judgments by judge identity x messages,
reward scores by model identity x text), so a rerun makes no call and scores nothing while still
rewriting the run directory's files. Retries cover transient errors only; a DpoEvalError (a user's
mistake, the --max-calls budget, or an API that kept failing through the openai client's own retries)
is final, and a rerun continues from the judges' caches.
"""

from __future__ import annotations

import logging
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from dpo_eval.tasks.evaluation import batch_for_attempt, oom_halvings
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dpo_eval.config import JudgeSpec
from dpo_eval.errors import DpoEvalError, is_out_of_memory

DEFAULT_LIMIT = "dpo-eval-judge"  # the global concurrency limit that judge API calls share by default


def _logger():
    """The run logger inside a flow or task run, this module's logger elsewhere."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _transient(task, task_run, state) -> bool:
    """Retry on lost connections and timeouts (the Prefect API's included), a locked cache database, and
    CUDA out of memory (the reward model retries with half the batch)."""
    import httpx

    try:
        state.result()
    except DpoEvalError:
        return False
    except Exception as exc:  # noqa: BLE001 - the state carries any exception
        return (is_out_of_memory(exc)
                or isinstance(exc, (ConnectionError, TimeoutError, httpx.TransportError, sqlite3.OperationalError)))
    return False


@contextmanager
def api_slots(limit_name: str | None, spec: JudgeSpec):
    """Hold `spec.concurrency` slots of the Prefect global concurrency limit `limit_name` (at most the limit
    itself) while the block runs, and yield the spec with its concurrency set to the slots held.

    judge_run takes no per-call hook, so the slots are held for the whole judge_run call rather than per
    API call: a run with K calls in flight holds K slots, and runs sharing the limit never have more calls
    in flight together than the limit allows. An API judge only (a local judge makes no API calls); without
    such a limit each run is bounded by its own spec.concurrency alone, and a warning says how to share one."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectNotFound

    if limit_name is None or spec.kind != "openai":
        yield spec
        return
    logger = _logger()
    try:
        with get_client(sync_client=True) as client:
            limit = client.read_global_concurrency_limit_by_name(limit_name)
    except ObjectNotFound:
        logger.warning("no global concurrency limit %r: this run alone keeps to %d judge calls in flight; create "
                       "one (prefect gcl create %s --limit N) to share N among all runs", limit_name,
                       spec.concurrency, limit_name)
        yield spec
        return
    if not limit.active:
        logger.warning("global concurrency limit %r is inactive: this run alone keeps to %d judge calls in flight",
                       limit_name, spec.concurrency)
        yield spec
        return
    if limit.limit < 1:
        raise DpoEvalError(f"global concurrency limit {limit_name!r} allows 0 slots: no judge call could run; "
                           f"raise it (prefect gcl update {limit_name} --limit N)")
    occupy = min(spec.concurrency, limit.limit)
    logger.info("holding %d of the %d slots of global concurrency limit %r for the judge's calls", occupy,
                limit.limit, limit_name)
    # A lease renewal that fails once (an API hiccup) must not cancel hours of judging: the slots lapse instead.
    with concurrency(limit_name, occupy=occupy, strict=True, raise_on_lease_renewal_failure=False):
        yield spec.model_copy(update={"concurrency": occupy})


@task(name="judge-answers", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_transient)
def judge_answers_task(run_dir: Path, spec: JudgeSpec, limit_name: str | None = DEFAULT_LIMIT) -> dict:
    """Pairwise LLM verdicts on the run: judgments.parquet and summary.json's judge block (returned)."""
    from dpo_eval.judges.pairwise import judge_run

    with api_slots(limit_name, spec) as bounded:
        return judge_run(run_dir, bounded)


@task(name="score-rewards", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_transient)
def score_rewards_task(run_dir: Path, reward_model: str, batch_size: int = 8) -> dict:
    """Reward-model scores as the feature reward_model, statistics re-run, summary.json's reward_model block."""
    from dpo_eval.studies.reward_scores import reward_judge_run

    with oom_halvings() as halvings:  # half the batch per out-of-memory failure, not per retry
        return reward_judge_run(run_dir, reward_model, batch_size=batch_for_attempt(batch_size, halvings))


@task(name="report-judgments", cache_policy=NO_CACHE)
def report_judgments_task(run_dir: Path, timings: dict | None = None) -> dict:
    """The judge sections of the report and summary.json's judge headline; returns the summary. (The flows
    recompute the four answers once, last: their verdict task.)"""
    from dpo_eval.report.judge import write_judge_report

    return write_judge_report(run_dir, timings)
