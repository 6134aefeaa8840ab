"""Leases of background task runs: how a flow tells a shard in work from a shard whose worker is gone.

A task worker that dies mid-shard (SIGKILL, a preempted spot machine) leaves its task run Running for
ever: Prefect's server hands a background task run to one worker and, once acknowledged, never hands it
out again. So the worker holding a shard renews a lease, a Prefect Variable named after the task run,
every quarter of the lease time; the flow (flows/task_workers.py) takes a shard whose lease has not been
renewed for the whole lease time as lost and submits it again. The lease lives on the Prefect server,
which every worker and the flow already reach; its clock is never compared across machines: the flow
only watches the renewal counter change on its own clock.

Two gaps are closed as well:
- received, not started: `dpo-eval worker` marks the lease `received` the moment it takes a task run off
  the server, before the task starts (reading its parameters, the engine's setup). A worker that dies in
  between leaves that mark unrenewed, and the flow treats it like any other lapsed lease, although the
  run is still Scheduled.
- hung, not dead: a lease with a `stall_s` is renewed only while the work reports progress (a finished
  generation batch): a worker whose GPU hangs keeps its process and its renewal thread alive, but after
  `stall_s` without progress the renewals stop and the flow gives the shard to another worker.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

PREFIX = "dpo-eval-lease-"
RECEIVED = "received"


def lease_name(task_run_id) -> str:
    return f"{PREFIX}{task_run_id}"


class Renewal:
    """Renews one lease through `write(beat)` every lease_s / 4 seconds on a thread, while the work has
    reported progress within stall_s (None: always); `progress()` is that report."""

    def __init__(self, write, lease_s: float, stall_s: float | None = None):
        self.write, self.lease_s, self.stall_s = write, lease_s, stall_s
        self.beat, self.stalled = 0, False
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpo-eval-lease", daemon=True)

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def start(self) -> "Renewal":
        self.write(self.beat)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            if self.stall_s is not None and time.monotonic() - self._last_progress > self.stall_s:
                self.stalled = True  # no renewal: the lease lapses and the flow gives the shard to another worker
                continue
            self.beat += 1
            try:
                self.write(self.beat)
            except Exception:  # noqa: BLE001 - a missed renewal is what the lease time allows for
                pass


class _NoLease:
    def progress(self) -> None:
        pass


@contextmanager
def held_lease(lease_s: float | None, stall_s: float | None = None):
    """Hold this task run's lease while the body runs (no-op without lease_s); yields an object whose
    `progress()` the body calls after each unit of work when stall_s is set."""
    if lease_s is None:
        yield _NoLease()
        return
    from prefect.runtime import task_run
    from prefect.variables import Variable

    from dpo_eval.pipeline import worker_label

    name, worker = lease_name(task_run.id), worker_label()
    renewal = Renewal(lambda beat: Variable.set(name, {"worker": worker, "beat": beat}, overwrite=True),
                      lease_s, stall_s).start()
    try:
        yield renewal
    finally:
        renewal.stop()
        try:
            Variable.unset(name)
        except Exception:  # noqa: BLE001 - a left-over lease of a finished run is harmless; the flow drops it
            pass


async def mark_received(task_run_id) -> None:
    """The worker has taken this task run off the server (before it starts): a lease the task renews once it
    runs, and that lapses if the worker dies first."""
    from prefect.variables import Variable

    from dpo_eval.pipeline import worker_label

    try:
        await Variable.aset(lease_name(task_run_id), {"worker": worker_label(), "beat": RECEIVED}, overwrite=True)
    except Exception:  # noqa: BLE001 - without the mark, the gap is only as wide as it was before
        pass


async def drop_lease(task_run_id) -> None:
    """Remove a task run's lease once its worker is done with it (a cached shard never renews one)."""
    from prefect.variables import Variable

    try:
        await Variable.aunset(lease_name(task_run_id))
    except Exception:  # noqa: BLE001 - a left-over lease of a finished run is harmless; the flow drops it
        pass
