"""Leases of background task runs: how a flow tells a shard in work from a shard whose worker is gone.

A task worker that dies mid-shard (SIGKILL, a preempted spot machine) leaves its task run Running for
ever: Prefect's server hands a background task run to one worker and, once acknowledged, never hands it
out again. So the worker holding a shard renews a lease, a Prefect Variable named after the task run,
every quarter of the lease time; the flow (flows/task_workers.py) takes a shard whose lease has not been
renewed for the whole lease time as lost and submits it again. The lease lives on the Prefect server,
which every worker and the flow already reach; its clock is never compared across machines: the flow
only watches the renewal counter change on its own clock.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

PREFIX = "dpo-eval-lease-"


def lease_name(task_run_id) -> str:
    return f"{PREFIX}{task_run_id}"


@contextmanager
def held_lease(lease_s: float | None):
    """Renew this task run's lease every lease_s / 4 seconds while the body runs (no-op without lease_s)."""
    if lease_s is None:
        yield
        return
    from prefect.runtime import task_run
    from prefect.variables import Variable

    from dpo_eval.pipeline import worker_label

    name, worker, stop = lease_name(task_run.id), worker_label(), threading.Event()

    def renew(beat: int) -> None:
        Variable.set(name, {"worker": worker, "beat": beat}, overwrite=True)

    def renew_until_stopped() -> None:
        beat = 1
        while not stop.wait(lease_s / 4):
            beat += 1
            try:
                renew(beat)
            except Exception:  # noqa: BLE001 - a missed renewal is what the lease time allows for
                pass

    renew(0)
    thread = threading.Thread(target=renew_until_stopped, name="dpo-eval-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        try:
            Variable.unset(name)
        except Exception:  # noqa: BLE001 - a left-over lease of a finished run is harmless; the flow drops it
            pass
