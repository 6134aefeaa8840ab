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

A live worker whose lease writes fail (a loaded API) logs the failure and retries with back-off; if they fail
for longer than the lease, the flow takes the shard as lost, marks the run Crashed and submits it again. The
first copy then stops on its own: the task checks its run's states when its body starts and again before Prefect
writes its result, and raises GivenToAnother where the flow marked the run Crashed, so it writes nothing.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from contextlib import contextmanager

PREFIX = "dpo-eval-lease-"
RECEIVED = "received"
RETRY_FIRST_S = 0.25  # a failed lease write is retried after this, then twice as long each time, at most `every`
CHECK_TRIES = 3  # reads of a task run's states before a worker takes it as still its own

log = logging.getLogger(__name__)


def lease_name(task_run_id) -> str:
    return f"{PREFIX}{task_run_id}"


def retry_delay(every: float, failures: int) -> float:
    """The wait before retrying a lease write after `failures` failed in a row: RETRY_FIRST_S, doubled after each
    failure, never longer than the renewal interval."""
    return min(every, RETRY_FIRST_S * 2 ** (failures - 1))


class Renewal:
    """Renews one lease through `write(beat)` every `every` seconds on a thread, while the work has reported
    progress within stall_s (None: always); `progress()` is that report, `configure()` sets both. A write that
    fails is logged (once per run of failures, and again when one succeeds) and retried with back-off."""

    def __init__(self, write, every: float, stall_s: float | None = None, first=0, name: str = "lease"):
        self.write, self.every, self.stall_s, self.name = write, every, stall_s, name
        self.beat, self.stalled = first, False
        self.failures = 0  # failed writes in a row
        self._next_s = every  # the wait before the next write
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
        self._next_s = self._renew()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._next_s):
            if self.stall_s is not None and time.monotonic() - self._last_progress > self.stall_s:
                self.stalled = True  # no renewal: the lease lapses and the flow gives the shard to another worker
                self._next_s = self.every
                continue
            self.stalled = False
            self.beat = self.beat + 1 if isinstance(self.beat, int) else 1
            self._next_s = self._renew()

    def _renew(self) -> float:
        """Write the current beat; the wait before the next write: `every`, or a back-off retry after a failure."""
        try:
            self.write(self.beat)
        except Exception as exc:  # noqa: BLE001 - any failure of the API: retried, and lapsing is the flow's call
            self.failures += 1
            if self.failures == 1:
                log.warning("%s: write failed (%s: %s); retrying with back-off", self.name,
                            type(exc).__name__, exc)
            return retry_delay(self.every, self.failures)
        if self.failures:
            log.warning("%s: written again after %d failed writes", self.name, self.failures)
            self.failures = 0
        return self.every


# Leases the worker process holds, by task run id (dpo_eval.flows.task_workers.ShardWorker starts and ends them).
WORKER_LEASES: dict = {}
RECEIVED_EVERY_S = 1.0  # renewal of a received run until its task sets the lease's own interval


def _writer(task_run_id, worker: str):
    """A write of this task run's lease that fails at once, without the Prefect client's own retries (up to a
    minute of back-off on a refused connection or a 503, longer than a renewal interval): Renewal retries it,
    with a back-off no longer than the interval."""
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
    from prefect.variables import Variable

    name = lease_name(task_run_id)

    def write(beat) -> None:
        with temporary_settings(updates={PREFECT_CLIENT_MAX_RETRIES: 0}):
            Variable.set(name, {"worker": worker, "beat": beat}, overwrite=True)

    return write


class GivenToAnother(RuntimeError):
    """This task run's lease lapsed and the flow gave its shard to another worker: this copy stops, unwritten."""


def given_to_another(task_run_id) -> bool:
    """Whether the flow took this task run as lost: it marks such a run Crashed (flows/task_workers.py), and a
    later state proposed here (a retry) does not undo that, so the run's states are read, not only its last. A
    run whose states cannot be read after CHECK_TRIES reads is taken as still this worker's: its result is
    written under a temporary name and renamed (dpo_eval.flows.task_workers.AtomicLocalFileSystem), so a second
    copy replaces it whole."""
    from prefect import get_client

    for attempt in range(1, CHECK_TRIES + 1):
        try:
            with get_client(sync_client=True) as client:
                return any(state.is_crashed() for state in client.read_task_run_states(task_run_id))
        except Exception as exc:  # noqa: BLE001 - an API that does not answer now: ask again, then carry on
            log.warning("task run %s: its states could not be read (%s: %s), attempt %d of %d", task_run_id,
                        type(exc).__name__, exc, attempt, CHECK_TRIES)
            if attempt < CHECK_TRIES:
                time.sleep(retry_delay(1.0, attempt))
    return False


def stop_if_given_to_another(task_run_id) -> None:
    if given_to_another(task_run_id):
        raise GivenToAnother(f"dpo-eval: task run {task_run_id} was given to another worker (its lease was not "
                             "renewed for the lease time: a loaded API or a stalled worker); this copy stops "
                             "without writing its result")


class _NoLease:
    def progress(self) -> None:
        pass


@contextmanager
def held_lease(lease_s: float | None, stall_s: float | None = None):
    """This task run's lease while the body runs (no-op without lease_s): on `dpo-eval worker` the worker's
    lease, set to renew every lease_s / 4 and to watch progress within stall_s, then back to plain renewal
    (the run may wait for a retry on this worker); elsewhere a lease of its own. Yields an object whose
    `progress()` the body calls after each unit of work. Raises GivenToAnother, before the body and again
    before Prefect writes the result, where the flow has given the run to another worker."""
    if lease_s is None:
        yield _NoLease()
        return
    from prefect.runtime import task_run

    from dpo_eval.stages import worker_label

    run_id = task_run.id
    stop_if_given_to_another(run_id)
    held = WORKER_LEASES.get(str(run_id))
    if held is not None:
        held.configure(lease_s / 4, stall_s)
        try:
            yield held
        finally:
            held.configure(lease_s / 4, None)
    else:
        renewal = Renewal(_writer(run_id, worker_label()), lease_s / 4, stall_s, name=lease_name(run_id)).start()
        try:
            yield renewal
        finally:
            renewal.stop()
            _unset(run_id)
    stop_if_given_to_another(run_id)


def _unset(task_run_id) -> None:
    from prefect.variables import Variable

    try:
        Variable.unset(lease_name(task_run_id))
    except Exception:  # noqa: BLE001 - a left-over lease of a finished run is harmless; the flow drops it
        pass


def start_worker_lease(task_run_id) -> Renewal:
    """The lease of a task run this worker has just taken off the server (beat `received`, renewed every
    second until its task sets the interval); registered for the task's held_lease. A first write that fails is
    retried with back-off like any renewal."""
    from dpo_eval.stages import worker_label

    renewal = Renewal(_writer(task_run_id, worker_label()), RECEIVED_EVERY_S, first=RECEIVED,
                      name=lease_name(task_run_id)).start()
    WORKER_LEASES[str(task_run_id)] = renewal
    return renewal


def end_worker_lease(task_run_id) -> None:
    """Stop renewing and remove the lease of a task run this worker is done with (finished, failed, cached)."""
    renewal = WORKER_LEASES.pop(str(task_run_id), None)
    if renewal is not None:
        renewal.stop()
    _unset(task_run_id)
