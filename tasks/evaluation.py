"""Thin Prefect tasks over dpo_eval: retries, content-based cache keys, persisted results."""

from __future__ import annotations

from contextlib import contextmanager

import polars as pl
from dpo_eval.tasks.leases import held_lease
from prefect import task
from prefect.cache_policies import NO_CACHE

from dpo_eval import stages
from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import is_out_of_memory
from dpo_eval.generation import generate, logprobs
from dpo_eval.generation.batch_plan import halved
from dpo_eval.generation.engines import reports_each_batch


def _generation_key(context, parameters) -> str:
    """Model identity (dpo_eval.identity) x generation settings x shard content: never a run id or a path.

    A shard whose prompts are all distinct keeps the key it had before answers were generated once per prompt
    (its answers are the same: generation.generate), so those cached answers still hit; a shard that repeats a
    prompt adds generate.SHARED_ANSWERS, so answers cached per pair for the same shard are never served."""
    from dpo_eval.data.pairs import prompt_representatives

    shard = parameters["shard"]
    version = generate.CODE_VERSION
    if len(prompt_representatives(shard)[0]) < shard.height:
        version += "+" + generate.SHARED_ANSWERS
    return "generate-" + "-".join([
        parameters["key"], stages.spec_hash(parameters["generation"]), parameters["model"],
        stages.content_hash(shard), version])


# Out-of-memory failures of each task run in this process (Prefect runs a task run's retries in the process that
# ran it): a retry halves the batch once per out-of-memory failure, never for a lost connection or a timeout.
OOM_FAILURES: dict[str, int] = {}


def batch_for_attempt(batch_size: int, halvings: int) -> int:
    """The batch size after `halvings` out-of-memory failures: halved each time, at least 1."""
    return halved(batch_size, halvings)


@contextmanager
def oom_halvings():
    """Yield how many times this task run ran out of memory so far; count one more when the body does."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    if context is None:  # called outside a task run: no retry to count for
        yield 0
        return
    key = str(context.task_run.id)
    halvings = OOM_FAILURES.get(key, 0)
    try:
        yield halvings
    except Exception as exc:
        if is_out_of_memory(exc):
            halvings += 1
        if (context.task_run.run_count or 1) > context.task.retries:  # the last attempt: no retry reads it
            OOM_FAILURES.pop(key, None)
        else:
            OOM_FAILURES[key] = halvings  # a retry after another failure keeps the batch the last one had
        raise
    OOM_FAILURES.pop(key, None)


def _is_oom(task, task_run, state) -> bool:
    """Retry on an accelerator out of memory (with half the batch, see oom_halvings) and on transient errors
    (the same batch again)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the state carries any exception
        return is_out_of_memory(exc) or isinstance(exc, (ConnectionError, TimeoutError))
    return False


@task(name="load-pairs", cache_policy=NO_CACHE)
def load_pairs_task(spec: DatasetSpec):
    from dpo_eval.data.pairs import read_pairs

    table, report = read_pairs(spec)
    return table, report.to_dict()


@task(name="load-sources", cache_policy=NO_CACHE)
def load_sources_task(specs: tuple[DatasetSpec, ...]):
    """The pairs of several data sets, each tagged with its source, and one load report of them all."""
    from dpo_eval.data.mixing import combined_report, read_sources

    table, reports = read_sources(specs)
    return table, combined_report(reports)


@task(name="identify-checkpoint", cache_policy=NO_CACHE)
def identify_task(spec: ModelSpec):
    """The complete identity of the base and the tuned model, taken once per run."""
    from dpo_eval.generation.models import check_paths
    from dpo_eval.identity import model_identity

    check_paths(spec)
    return model_identity(spec)


@task(name="generate-answers", cache_key_fn=_generation_key, persist_result=True, retries=2,
      retry_delay_seconds=[5, 30], retry_condition_fn=_is_oom)
def generate_answers_task(spec: ModelSpec, generation: GenerationSpec, shard: pl.DataFrame, model: str,
                          key: str, lease_s: float | None = None,
                          stall_s: float | None = None) -> tuple[pl.DataFrame, list[str]]:
    """One model's answers to one shard; on a task worker (lease_s set) under a lease renewed while a batch
    has finished within stall_s (tasks/leases.py)."""
    from prefect.runtime import task_run

    if (task_run.run_count or 1) > 1:
        stages.release_models()  # a retry starts from a clean slate: what the failed attempt held is given back
    if not reports_each_batch(generation.engine):
        stall_s = None  # no progress to watch until the shard is done
    with oom_halvings() as halvings, held_lease(lease_s, stall_s) as lease:  # half the batch per out-of-memory
        return stages.generate_shard(spec, generation, shard, model, key, halvings,
                                     on_batch=lambda n: lease.progress())


@task(name="score-texts", cache_policy=NO_CACHE, retries=1)
def score_texts_task(texts: pl.DataFrame, spec: ScoringSpec, lease_s: float | None = None):
    """Scores of a shard of texts; the scoring cache makes one text scored once, ever (on a task worker,
    lease_s set, under a renewed lease)."""
    with held_lease(lease_s):
        scores, stats = stages.score_frame(texts, spec)
    return scores, {"hits": stats.hits, "misses": stats.misses}


@task(name="compare-features", cache_policy=NO_CACHE)
def compare_features_task(features: pl.DataFrame, spec: AnalysisSpec, reference: pl.DataFrame | None = None):
    from dpo_eval.stats.analysis import run_analysis

    return run_analysis(features, spec, reference)


def _rewards_key(context, parameters) -> str:
    """Identity of both sides (pair_key: tuned and the reference; prompt template included) x beta x max_length
    x pairs content."""
    return "rewards-" + "-".join([parameters["key"], str(parameters["beta"]), str(parameters["max_length"]),
                                  stages.content_hash(parameters["pairs"], ("pair_id", "split")), logprobs.CODE_VERSION])


@task(name="implicit-rewards", cache_key_fn=_rewards_key, persist_result=True, retries=1)
def implicit_rewards_task(spec: ModelSpec, pairs: pl.DataFrame, beta: float, max_length: int | None,
                          key: str) -> pl.DataFrame:
    return stages.compute_rewards(spec, pairs, beta, max_length, key)


@task(name="analyze-sources", cache_policy=NO_CACHE)
def analyze_sources_task(features: pl.DataFrame, pairs: pl.DataFrame, spec: AnalysisSpec,
                         rewards: pl.DataFrame | None = None) -> dict:
    """Each data set's pairs analysed alone (dpo_eval.studies.per_source)."""
    from dpo_eval.studies.per_source import per_source

    return per_source(features, pairs, spec, rewards)


@task(name="compare-quantizations", cache_policy=NO_CACHE)
def compare_quantizations_task(config: EvalConfig) -> dict:
    """quantization.json and the report's section, from the sub-runs of the quantization study."""
    from dpo_eval.studies.quantization import write_study

    return write_study(config)


@task(name="release-models", cache_policy=NO_CACHE)
def release_models_task() -> None:
    """Give the model's memory back before a stage that does not need it."""
    stages.release_models()
