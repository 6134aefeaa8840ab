"""Leases of background task runs: how a flow tells a shard in work from a shard whose worker is gone.

A task worker that dies mid-shard (SIGKILL, a preempted spot machine) leaves its task run Running for
ever: Prefect's server hands a background task run to one worker and, once acknowledged, never hands it
out again. So the worker holding a shard renews a lease, a Prefect Variable named after the task run,
every quarter of the lease time; the flow (flows/task_workers.py) takes a shard whose lease has not been
renewed for the whole lease time as lost and submits it again. The lease lives on the Prefect server,
which every worker and the flow already reach; its clock is never compared across machines: the flow
only watches the renewal counter change on its own clock.

On `dpo-eval worker` (flows/task_workers.py) the lease is the worker's, for the task run's whole life
there, not only while the task body runs:
- taken, not started: the worker starts the lease (beat `received`, renewed every second) the moment it
  takes a task run off the server, before reading its parameters; a worker that dies before the task
  starts leaves it unrenewed, and the flow treats that like any other lapsed lease although the run is
  still Scheduled. A slow start (parameters from slow storage) keeps renewing, so it is not taken for a death.
- between retries: after an out-of-memory error the run waits in AwaitingRetry (a Scheduled state) on the
  same worker; the lease keeps being renewed there, and lapses if the worker dies in the wait.
- hung, not dead: while the task runs, a generation shard reports progress (the model loaded, each
  finished batch) and the lease is renewed only while progress came within `stall_s`: a worker whose GPU
  hangs keeps its process and its renewal thread alive, but its renewals stop and the flow gives the
  shard to another worker.
Elsewhere (a plain Prefect task worker) the task holds its own lease while its body runs, as before.
"""

from __future__ import annotations

import contextvars
import threading
import time
from contextlib import contextmanager

PREFIX = "dpo-eval-lease-"
RECEIVED = "received"


def lease_name(task_run_id) -> str:
    return f"{PREFIX}{task_run_id}"


class Renewal:
    """Renews one lease through `write(beat)` every `every` seconds on a thread, while the work has reported
    progress within stall_s (None: always); `progress()` is that report, `configure()` sets both."""

    def __init__(self, write, every: float, stall_s: float | None = None, first=0):
        self.write, self.every, self.stall_s = write, every, stall_s
        self.beat, self.stalled = first, False
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        # the creator's context: Prefect settings (the API URL) can be context-local
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="dpo-eval-lease", daemon=True)

    def progress(self) -> None:
        self._last_progress = time.monotonic()

    def configure(self, every: float, stall_s: float | None) -> None:
        self.every, self.stall_s = every, stall_s
        self.progress()

    def start(self) -> "Renewal":
        self.write(self.beat)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.stall_s is not None and time.monotonic() - self._last_progress > self.stall_s:
                self.stalled = True  # no renewal: the lease lapses and the flow gives the shard to another worker
                continue
            self.stalled = False
            self.beat = self.beat + 1 if isinstance(self.beat, int) else 1
            try:
                self.write(self.beat)
            except Exception:  # noqa: BLE001 - a missed renewal is what the lease time allows for
                pass


# Leases the worker process holds, by task run id (dpo_eval.flows.task_workers.ShardWorker starts and ends them).
WORKER_LEASES: dict = {}
RECEIVED_EVERY_S = 1.0  # renewal of a received run until its task sets the lease's own interval


def _writer(task_run_id, worker: str):
    from prefect.variables import Variable

    name = lease_name(task_run_id)
    return lambda beat: Variable.set(name, {"worker": worker, "beat": beat}, overwrite=True)


class _NoLease:
    def progress(self) -> None:
        pass


@contextmanager
def held_lease(lease_s: float | None, stall_s: float | None = None):
    """This task run's lease while the body runs (no-op without lease_s): on `dpo-eval worker` the worker's
    lease, set to renew every lease_s / 4 and to watch progress within stall_s, then back to plain renewal
    (the run may wait for a retry on this worker); elsewhere a lease of its own. Yields an object whose
    `progress()` the body calls after each unit of work."""
    if lease_s is None:
        yield _NoLease()
        return
    from prefect.runtime import task_run

    from dpo_eval.stages import worker_label

    held = WORKER_LEASES.get(str(task_run.id))
    if held is not None:
        held.configure(lease_s / 4, stall_s)
        try:
            yield held
        finally:
            held.configure(lease_s / 4, None)
        return
    renewal = Renewal(_writer(task_run.id, worker_label()), lease_s / 4, stall_s).start()
    try:
        yield renewal
    finally:
        renewal.stop()
        _unset(task_run.id)


def _unset(task_run_id) -> None:
    from prefect.variables import Variable

    try:
        Variable.unset(lease_name(task_run_id))
    except Exception:  # noqa: BLE001 - a left-over lease of a finished run is harmless; the flow drops it
        pass


def start_worker_lease(task_run_id) -> Renewal:
    """The lease of a task run this worker has just taken off the server (beat `received`, renewed every
    second until its task sets the interval); registered for the task's held_lease."""
    from dpo_eval.stages import worker_label

    renewal = Renewal(_writer(task_run_id, worker_label()), RECEIVED_EVERY_S, first=RECEIVED)
    try:
        renewal.start()
    except Exception:  # noqa: BLE001 - the first write failed: renewals will retry it
        renewal._thread.start()
    WORKER_LEASES[str(task_run_id)] = renewal
    return renewal


def end_worker_lease(task_run_id) -> None:
    """Stop renewing and remove the lease of a task run this worker is done with (finished, failed, cached)."""
    renewal = WORKER_LEASES.pop(str(task_run_id), None)
    if renewal is not None:
        renewal.stop()
    _unset(task_run_id)
