"""The restart cap of a flow run that the crash automation reschedules (deployments/automations.py).

Flow retries do not cover a crashed process; the automation puts a crashed run back to Scheduled, and
Prefect counts every start in `flow_run.run_count`. A run started more than `max_restarts + 1` times
fails (not crashes), which the automation does not react to: the loop ends there. The watcher
(flows/watch.py) reads the same cap: a crashed run with `restarts_left` is still its evaluation.
"""

from __future__ import annotations


class TooManyRestarts(RuntimeError):
    """The flow run was started more often than its restart cap allows."""


def restarts_left(max_restarts: int, run_count: int) -> int:
    """How many more starts the cap allows a run started `run_count` times (negative: past the cap)."""
    return max_restarts + 1 - run_count


def check_restarts(max_restarts: int, run_count: int | None = None) -> int:
    """The number of this start (1 = first); raise TooManyRestarts past `max_restarts` restarts.

    `run_count` defaults to the current flow run's (1 outside a flow run)."""
    if run_count is None:
        from prefect.runtime import flow_run

        run_count = flow_run.run_count or 1
    if restarts_left(max_restarts, run_count) < 0:
        raise TooManyRestarts(f"started {run_count} times: more than max_restarts={max_restarts} restarts after "
                              "crashes; fix the worker (or raise max_restarts) and run again")
    return run_count
