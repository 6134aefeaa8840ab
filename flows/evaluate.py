"""The evaluation DAG: pairs -> shards -> base and tuned answers -> scores -> statistics -> report."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import polars as pl
from dpo_eval.flows.judge import raise_failures, run_judges
from dpo_eval.flows.progress import stage_progress
from dpo_eval.flows.restarts import check_restarts
from dpo_eval.flows.task_workers import run_on_workers
from dpo_eval.flows.turns import generate_second_turn, second_turn_texts, write_groups
from dpo_eval.tasks.evaluation import (
    analyze_sources_task,
    compare_features_task,
    compare_quantizations_task,
    generate_answers_task,
    identify_task,
    implicit_rewards_task,
    load_pairs_task,
    load_sources_task,
    release_models_task,
    score_texts_task,
)
from dpo_eval.tasks.forgetting import compare_benchmarks_task, report_forgetting_task
from dpo_eval.tasks.judging import DEFAULT_LIMIT
from dpo_eval.tasks.turns import compare_groups_task
from dpo_eval.tasks.verdict import verdict_task
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed

from dpo_eval import stages
from dpo_eval.config import EvalConfig
from dpo_eval.data.prompt_sets import CATEGORY, first_turn
from dpo_eval.forgetting.harness import raise_failures as raise_forgetting_failures
from dpo_eval.generation.turns import has_second_turn
from dpo_eval.generation.logprobs import reward_summary
from dpo_eval.reference import reference_adapter, reference_label
from dpo_eval.report.forgetting import forgetting_markdown
from dpo_eval.report.forgetting import headline as forgetting_headline
from dpo_eval.report.judge import judge_markdown
from dpo_eval.report.page import rewards_section, stats_table_rows, summary_markdown, write_outputs
from dpo_eval.studies.per_source import has_sources, source_section
from dpo_eval.studies.quantization import STUDY_FILE, setting_config
from dpo_eval.studies.verdict import verdict_lines

SCORE_SHARD = 2000  # texts per scoring task


@contextmanager
def _timed(timings: dict, stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)


def _collect(futures: list, sizes: list[int], stage: str, unit: str) -> list:
    """The futures' results in submission order; the stage's progress advances as each one finishes."""
    with stage_progress(stage, sum(sizes), unit) as progress:
        size_of = {id(f): n for f, n in zip(futures, sizes)}
        for future in as_completed(futures):
            progress.advance(size_of[id(future)])
    return [f.result() for f in futures]


def _score_shards(texts: pl.DataFrame, config: EvalConfig, stage: str = "scoring") -> list:
    """Scoring shards on the flow's task runner (local processes), a Dask cluster, or the task workers."""
    if config.scoring_runner == "local":
        starts = range(0, texts.height, SCORE_SHARD)
        futures = [score_texts_task.submit(texts.slice(i, SCORE_SHARD), config.scoring) for i in starts]
        return _collect(futures, [texts.slice(i, SCORE_SHARD).height for i in starts], stage, "texts")
    if config.scoring_runner == "task-workers":
        parts = [texts.slice(i, SCORE_SHARD) for i in range(0, texts.height, SCORE_SHARD)]
        return run_on_workers(score_texts_task, [{"texts": p, "spec": config.scoring} for p in parts],
                              [p.height for p in parts], config.worker_lease_s, stage, "texts").results
    from prefect_dask import DaskTaskRunner

    workers = config.scoring.n_process or os.cpu_count() or 1
    runner = DaskTaskRunner(address=config.dask_address) if config.dask_address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})
    spec = config.scoring.model_copy(update={"n_process": 1})  # the cluster is the parallelism
    size = max(1, -(-texts.height // (workers * 2)))
    with runner:
        starts = range(0, texts.height, size)
        futures = [runner.submit(score_texts_task, parameters={"texts": texts.slice(i, size), "spec": spec})
                   for i in starts]
        return _collect(futures, [texts.slice(i, size).height for i in starts], stage, "texts")


def _generate(config: EvalConfig, shards: list, identity, n_pairs: int, logger) -> tuple[list, int, dict | None]:
    """(results, cache hits, the task workers' account or None) of every shard x (base, tuned): in this
    process one after another, or on the task workers (flows/task_workers.py)."""
    calls = [{"spec": config.model, "generation": config.generation, "shard": shard, "model": model,
              "key": identity.key(model)} for shard in shards for model in ("base", "tuned")]
    if config.generation_runner == "task-workers":
        calls = [call | {"stall_s": config.worker_stall_s} for call in calls]
        done = run_on_workers(generate_answers_task, calls, [c["shard"].height for c in calls],
                              config.worker_lease_s, "generation", "answers", logger)
        return done.results, done.hits, {"resubmitted": done.resubmitted}
    states = []
    with stage_progress("generation", 2 * n_pairs, "answers") as progress:
        for call in calls:
            states.append(generate_answers_task(**call, return_state=True))
            progress.advance(call["shard"].height)
    return [s.result() for s in states], sum(s.name == "Cached" for s in states), None


def _quantization_study(config: EvalConfig, judge_limit: str | None) -> dict:
    """Each further quantization setting as a sub-run (this flow again, as a subflow: every stage cached as
    usual), then their comparison with this run; returns the summary with its `quantization` block."""
    started = time.perf_counter()
    for setting in config.quantization_study:
        evaluate_checkpoint(setting_config(config, setting), judge_limit)
    study = compare_quantizations_task(config)
    path = config.out / "summary.json"
    summary = json.loads(path.read_text())
    summary["timings"]["quantization_study"] = round(time.perf_counter() - started, 3)
    summary["quantization"] = {"file": STUDY_FILE, "reference": study["reference"],
                               "settings": {s: {k: r[k] for k in ("identical_answers", "features_moved", "n_features")}
                                            for s, r in study["settings"].items()}}
    path.write_text(json.dumps(summary, indent=2))
    return summary


@flow(name="evaluate-checkpoint", log_prints=True)
def evaluate_checkpoint(config: EvalConfig, judge_limit: str | None = DEFAULT_LIMIT) -> dict:
    """Evaluate one DPO checkpoint against its base; returns the summary (also in summary.json). With
    config.reward_model or config.judge, the judges run once the report is written; the LLM judge's API calls
    hold slots of the global concurrency limit `judge_limit` (None: its own concurrency only)."""
    logger = get_run_logger()
    check_restarts(config.max_restarts)
    stages.require_adapter(config.model)
    out = config.out
    timings, cache = {}, {}
    with _timed(timings, "load_pairs"):
        if config.extra_datasets:
            pairs, load_report = load_sources_task((config.dataset, *config.extra_datasets))
        else:
            pairs, load_report = load_pairs_task(config.dataset)
        pairs, split_source = stages.apply_training_split(pairs, config.model.adapter)
        reference, reference_report = None, None
        if config.reference_dataset is not None:
            reference, reference_report = load_pairs_task(config.reference_dataset)
            reference, reference_report["split_source"] = stages.apply_training_split(reference,
                                                                                         config.model.adapter)
        labeled = stages.check_labels(pairs, reference, config)
        identity = identify_task(config.model)
    out.mkdir(parents=True, exist_ok=True)
    pairs.write_parquet(out / "pairs.parquet")
    if reference is not None:
        reference.write_parquet(out / stages.REFERENCE_PAIRS)
    logger.info("pairs: %s%s", load_report["pairs"], "" if labeled else " (questions without labels)")

    with _timed(timings, "generate"):
        shards = stages.shard_pairs(pairs, config.shard_size)
        results, hits, workers = _generate(config, shards, identity, pairs.height, logger)
        answers = pl.concat([stages.with_worker(r[0]) for r in results])
        repairs = list(dict.fromkeys(r for _, rs in results for r in rs))
        cache["generate"] = {"hits": hits, "misses": len(results) - hits}
        if has_second_turn(pairs):  # turn 2 after each model's own turn-1 answer: answers gain `turn`
            answers, cache["generate_turn2"] = generate_second_turn(config, pairs, answers, identity)
    answers.write_parquet(out / "answers.parquet")
    release_models_task()  # scoring needs the memory, not the model

    with _timed(timings, "score"):
        texts = stages.texts_of(pairs, first_turn(answers))
        later = second_turn_texts(pairs, answers) if "turn" in answers.columns else None
        results = _score_shards(texts if later is None else pl.concat([texts, later]), config)
        scores = pl.concat([r[0] for r in results])
        cache["score"] = {k: sum(r[1][k] for r in results) for k in ("hits", "misses")}
    features = stages.features_table(texts, scores.head(texts.height))
    features.write_parquet(out / "features.parquet")  # turn 1: the file every reader knows
    by_turn = {1: features}
    if later is not None:
        by_turn[2] = stages.features_table(later, scores.slice(texts.height))
        by_turn[2].write_parquet(out / "features_turn2.parquet")
    reference_features = None
    if reference is not None:
        with _timed(timings, "score_reference"):
            reference_texts = stages.texts_of(reference)
            results = _score_shards(reference_texts, config, stage="scoring-reference")
            reference_features = stages.features_table(reference_texts, pl.concat([r[0] for r in results]))
            cache["score_reference"] = {k: sum(r[1][k] for r in results) for k in ("hits", "misses")}
        reference_features.write_parquet(out / stages.REFERENCE_FEATURES)

    with _timed(timings, "analyze"):
        analysis = compare_features_task(features, config.analysis, reference_features)
    rewards, rewards_summary, extra = None, None, []
    groups = {}
    if len(by_turn) > 1 or CATEGORY in pairs.columns:
        with _timed(timings, "analyze_turns_categories"):
            groups, sections = write_groups(compare_groups_task(by_turn, pairs, config.analysis, analysis.stats),
                                            out, config.analysis.alpha)
        extra += sections
    if config.rewards and not labeled:
        logger.info("implicit rewards skipped: the data set has no chosen and rejected answers to score")
    if config.rewards and labeled:
        with _timed(timings, "rewards"):
            beta, max_length = stages.reward_beta(config), stages.reward_max_length(config)
            rewards = implicit_rewards_task(config.model, pairs, beta, max_length, identity.pair_key)
            release_models_task()
            rewards.write_parquet(out / "rewards.parquet")
            rewards_summary = reward_summary(rewards)
            extra.append(rewards_section(rewards, rewards_summary, out, beta=beta, max_length=max_length))
    by_source = None
    if has_sources(pairs):
        with _timed(timings, "analyze_sources"):
            by_source = analyze_sources_task(features, pairs, config.analysis, rewards)
        extra.append(source_section(by_source))
    forgetting = None
    if config.forgetting is not None:
        with _timed(timings, "forgetting"):
            forgetting = compare_benchmarks_task(config.model, config.forgetting, out)
            release_models_task()
    stages.write_config(config, out, {"fingerprint": identity.tuned_key, "base_fingerprint": identity.base_key,
                                        "model_identity": identity.to_dict(), "repairs": repairs,
                                        "pairs_report": load_report, "split_source": split_source,
                                        "reference_report": reference_report})
    with _timed(timings, "report"):
        summary = analysis.summary | {"left_out": load_report["left_out"], "duplicates": load_report["duplicates"],
                                      "split_source": split_source,
                                      "timings": timings, "cache": cache,
                                      "workers": stages.worker_account(answers, config.generation_runner, workers),
                                      "reference": {"adapter": reference_adapter(config.model),
                                                    "label": reference_label(config.model)}}
        summary |= groups  # turns and feature_categories of two-turn sets and categories
        if rewards_summary is not None:
            summary["implicit_reward"] = rewards_summary  # one object per split, nothing else
            summary["implicit_reward_beta"] = beta
            summary["implicit_reward_max_length"] = max_length
        if by_source is not None:
            summary["by_source"] = by_source
        if forgetting is not None:
            summary["forgetting"] = {"headline": forgetting_headline(forgetting), "tasks": forgetting["tasks"],
                                     "failed": forgetting["failed"], "file": "forgetting.json"}
        summary = write_outputs(analysis.stats, summary, out, extra)
        if forgetting is not None and forgetting["tasks"]:
            report_forgetting_task(out, forgetting)
    if config.quantization_study:
        summary = _quantization_study(config, judge_limit)
    stats, failed = analysis.stats, []
    if config.judge is not None or config.reward_model:
        summary, failed = run_judges(out, config.judge, config.reward_model, judge_limit)
        stats = pl.read_parquet(out / "stats.parquet")  # with the reward_model feature where it was scored
    summary = verdict_task(out)  # the four answers, from every stage's results (a stopped judge's too)
    for line in verdict_lines(summary):
        logger.info(line)
    create_markdown_artifact(summary_markdown(summary) + judge_markdown(summary)
                             + (forgetting_markdown(forgetting) if forgetting is not None else ""),
                             key="dpo-eval-summary", description="dpo-eval summary")
    create_table_artifact(stats_table_rows(stats), key="dpo-eval-stats", description="dpo-eval statistics")
    raise_failures(failed)  # a judge that stopped fails the run, after its partial report and the artifacts
    if forgetting is not None:
        raise_forgetting_failures(forgetting, out)  # so does a benchmark task that could not run
    return summary
