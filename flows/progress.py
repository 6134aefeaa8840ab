"""Progress people can see in the Prefect UI: one progress artifact per long stage of a flow run."""

from __future__ import annotations

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dpo_eval.progress import StageProgress


def percent(done: int, total: int) -> float:
    return 100.0 * done / total if total else 100.0


def stage_progress(stage: str, total: int, unit: str) -> StageProgress:
    """A StageProgress (terminal bar on a terminal) that also keeps the progress artifact `dpo-eval-<stage>`
    of the current flow run at done / total, described as '<unit> done of <total>'."""
    description = f"{stage}: {unit} done of {total}"
    artifact_id = create_progress_artifact(progress=0.0, key=f"dpo-eval-{stage}", description=description)

    def listener(done: int, total: int) -> None:
        update_progress_artifact(artifact_id=artifact_id, progress=percent(done, total),
                                 description=f"{stage}: {done} of {total} {unit} done")

    return StageProgress(stage, total, unit, listener)
