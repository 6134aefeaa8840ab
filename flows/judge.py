"""The judge stage (reward model, LLM judge, their report) and the `judge-run` flow that adds verdicts to
an existing run directory without generating anything."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
from dpo_eval.tasks.judging import DEFAULT_LIMIT, judge_answers_task, report_judgments_task, score_rewards_task
from dpo_eval.tasks.verdict import verdict_task
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dpo_eval.config import JudgeSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.report.judge import judge_markdown
from dpo_eval.report.page import answers_markdown, stats_table_rows, summary_markdown


def run_judges(run_dir: Path, judge: JudgeSpec | None, reward_model: str | None,
               limit_name: str | None = DEFAULT_LIMIT, reward_batch_size: int = 8) -> tuple[dict, list]:
    """The reward model (a feature, statistics re-run), then the LLM judge, then their report. Returns the
    summary and the failed states of the judges: the caller raises them (`raise_failures`) once its artifacts
    are written, so a judge that stops (budget, failing API) still leaves its partial report and summary."""
    states = []
    if reward_model:
        states.append(score_rewards_task(run_dir, reward_model, reward_batch_size, return_state=True))
    timings = {}
    if judge is not None:
        started = time.perf_counter()
        states.append(judge_answers_task(run_dir, judge, limit_name, return_state=True))
        timings["judge"] = round(time.perf_counter() - started, 3)
    summary = report_judgments_task(run_dir, timings)
    return summary, [state for state in states if not state.is_completed()]


def raise_failures(failed: list) -> None:
    """Raise the first failed judge's own error."""
    for state in failed:
        state.result()


def summary_artifact(summary: dict) -> str:
    """The summary artifact's markdown: the run's summary (where the run has statistics) and the judges."""
    head = summary_markdown(summary) if "significant" in summary else \
        "\n".join(["# dpo-eval judges", "", *answers_markdown(summary)])
    return head + judge_markdown(summary)


@flow(name="judge-run", log_prints=True)
def judge_existing_run(run_dir: Path, judge: JudgeSpec | None = None, reward_model: str | None = None,
                       reward_batch_size: int = 8, concurrency_limit: str | None = DEFAULT_LIMIT) -> dict:
    """Add judge verdicts to the run directory of an earlier evaluation (nothing is generated): the reward
    model's feature and calibration, the LLM judge's judgments.parquet, summary.json's blocks and the
    report's sections. API calls of the LLM judge hold slots of the global concurrency limit
    `concurrency_limit` (None: this run's own judge.concurrency only). Returns the summary."""
    run_dir = Path(run_dir)
    if judge is None and not reward_model:
        raise DpoEvalError("judge-run: give a judge (JudgeSpec), a reward model, or both")
    if not (run_dir / "pairs.parquet").is_file():
        raise DpoEvalError(f"{run_dir}: no pairs.parquet; give the run directory of `dpo-eval evaluate`")
    summary, failed = run_judges(run_dir, judge, reward_model, concurrency_limit, reward_batch_size)
    summary = verdict_task(run_dir)  # the four answers with the judges' verdicts, once, last
    create_markdown_artifact(summary_artifact(summary), key="dpo-eval-summary", description="dpo-eval summary")
    if reward_model and (run_dir / "stats.parquet").is_file():
        create_table_artifact(stats_table_rows(pl.read_parquet(run_dir / "stats.parquet")), key="dpo-eval-stats",
                              description="dpo-eval statistics")
    raise_failures(failed)
    return summary
