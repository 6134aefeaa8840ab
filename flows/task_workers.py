"""Shards on N machines: Prefect task workers (`dpo-eval worker`) and the flow side that feeds and watches them.

Why task workers and not a `generate-shard` deployment started with run_deployment: a deployment's run
is a new process on the worker (a process or docker worker starts one per flow run), so every shard
would load the model again; a task worker is one long-lived process that runs background task runs
(`task.delay()`) in threads, so the model it loaded for the first shard (pipeline.cached_model, keyed on
the model identity) serves every later shard of that identity. Shards keep their cache keys, results go
to the shared result storage, so a shard done by any worker, in any run, is never redone.

A worker lost mid-shard is found by its lease (tasks/leases.py) and the shard is submitted again; the
stale task run is marked Crashed so the UI tells the truth. A worker taken for lost that was alive (its lease
writes failed for the lease time) stops before writing when it sees that mark, and results are written under
a temporary name and renamed (AtomicLocalFileSystem), so two copies of a shard never leave a result half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dpo_eval.tasks.leases import end_worker_lease, lease_name, start_worker_lease
from prefect.filesystems import LocalFileSystem

from dpo_eval.errors import DpoEvalError

POLL_S = 1.0
READ_PAGE = 200
MAX_RESUBMITS = 3  # per shard: a shard that loses its worker more often than this stops the run
SAVE_TRIES = 5  # saves of the result storage block: workers starting together race to register its type


def serve_shards(limit: int = 1) -> None:
    """Run a task worker for generation and scoring shards until stopped (the `dpo-eval worker` command)."""
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise DpoEvalError("dpo-eval worker needs PREFECT_API_URL: the Prefect server that the evaluation's flow "
                           "also uses (e.g. http://HOST:4200/api); a worker on a private ephemeral server gets no work")
    import asyncio
    import signal

    from dpo_eval.tasks.evaluation import generate_answers_task, score_texts_task
    from prefect.task_worker import StopTaskWorker

    def stop(signum, frame):  # SIGTERM ends the worker as Ctrl-C does, without a traceback
        raise StopTaskWorker

    async def run() -> None:  # a TaskWorker is made inside its event loop
        await ShardWorker(generate_answers_task, score_texts_task, limit=limit).astart()

    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(run())
    except (KeyboardInterrupt, StopTaskWorker):  # Ctrl-C, or SIGTERM
        pass


# What ShardWorker uses of Prefect, all public: TaskWorker(*tasks, limit), `async with` it, its client_id and
# task_keys, and execute_task_run(task_run); Subscription (prefect.client.subscriptions) on the REST route that
# Prefect's own worker reads, and its websocket's close(). tests/test_prefect_api.py pins each of them and names what changed on an upgrade.
# For its results: aget_default_result_storage, a LocalFileSystem subclass (write_path and awrite_path, the names
# Prefect's result store calls) saved with Block.asave, and Task.with_options(result_storage=...).
SCHEDULED_ROUTE = "/task_runs/subscriptions/scheduled"


class AtomicLocalFileSystem(LocalFileSystem):
    """Prefect's local result folder, each file written whole: to a temporary name beside it, then renamed over
    it (os.replace), so a reader sees the old file or the new one, never a part. Two copies of a shard (one
    taken for lost, then submitted again) write the same key; Prefect's LocalFileSystem truncates and rewrites
    the file in place."""

    _block_type_name = "dpo-eval atomic local file system"  # its own block type: Prefect's stays Prefect's

    def write_path(self, path: str, content: bytes, **dispatch) -> str:
        """Write `content` at `path` (relative to basepath, or absolute inside it); `dispatch`: the `_sync` flag
        Prefect's result store passes, which a synchronous method does not need."""
        target = self._target(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not target.is_file():
            raise ValueError(f"Path {target} already exists and is not a file.")
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "xb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())  # on disk before it takes the name: a machine lost after it is whole too
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        return str(target)

    async def awrite_path(self, path: str, content: bytes) -> str:
        import anyio

        return await anyio.to_thread.run_sync(self.write_path, path, content)

    def _target(self, path: str) -> Path:
        """`path` resolved as LocalFileSystem resolves it: under basepath (the working folder without one)."""
        base = Path(self.basepath).expanduser().resolve() if self.basepath else Path(".").resolve()
        target = Path(path).expanduser()
        target = (target if target.is_absolute() else base / target).resolve()
        if base != target and base not in target.parents:
            raise ValueError(f"Provided path {target} is outside of the base path {base}.")
        return target


async def atomic_result_storage():
    """An AtomicLocalFileSystem on the folder this process writes results to by default, where that is Prefect's
    local folder (PREFECT_RESULTS_LOCAL_STORAGE_PATH), which also holds the task parameters; None otherwise (a
    storage block such as S3 writes each object whole already). Saved as a block named after the folder, as
    Prefect requires of a task's result storage: a reader of a result loads it to find the file."""
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.results import aget_default_result_storage
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    default = await aget_default_result_storage()
    if (type(default) is not LocalFileSystem or settings.tasks.scheduling.default_storage_block is not None
            or Path(default.basepath) != Path(settings.results.local_storage_path)):
        return None
    storage = AtomicLocalFileSystem(basepath=default.basepath)
    folder = str(Path(default.basepath).expanduser().resolve())
    name = f"dpo-eval-results-{hashlib.sha256(folder.encode()).hexdigest()[:16]}"
    for attempt in range(1, SAVE_TRIES + 1):
        try:
            await storage.asave(name, overwrite=True)
            return storage
        except ObjectAlreadyExists:  # a worker starting beside this one registered the block type first
            if attempt == SAVE_TRIES:
                raise


def with_atomic_results(tasks, storage) -> list:
    """Copies of `tasks` (the same task keys) whose results go to `storage`; the tasks themselves without one,
    and any task that names its own result storage."""
    if storage is None:
        return list(tasks)
    return [task.with_options(result_storage=storage) if task.result_storage is None else task for task in tasks]


class ShardWorker:
    """A Prefect TaskWorker that takes a task run off the server only when it has room to run it.

    Prefect 3.9's worker acknowledges every task run the server sends as soon as it arrives and only then
    waits for a free slot: a busy worker holds one more shard than it runs, and when that worker dies the
    server, which forgets a task run once acknowledged, never hands that shard to anyone (it stays
    Scheduled, with no lease to lapse). This worker waits for a slot first, then reads (and acknowledges) the
    next task run; a shard sent to it but not yet read goes back to the server's queue when it dies, and the
    server gives it to another worker. A task run it has read gets a lease at once, renewed until the run is
    done here (tasks/leases.py), so dying before starting it or between retries is noticed too. Running the task
    run (engine, results, cache) is Prefect's own: TaskWorker.execute_task_run. Nothing here overrides a method
    of Prefect's.
    """

    def __init__(self, *tasks, limit: int = 1):
        self.tasks, self.limit = tasks, limit
        self.worker = None  # the TaskWorker, made by astart once the result storage is known
        self._scope = None
        self._in_flight: set = set()  # task run ids running here: one delivered twice runs (and is leased) once

    async def astart(self) -> None:
        import anyio
        from prefect.client.schemas.objects import TaskRun
        from prefect.client.subscriptions import Subscription
        from prefect.settings import get_current_settings
        from prefect.task_worker import TaskWorker

        self.worker = TaskWorker(*with_atomic_results(self.tasks, await atomic_result_storage()), limit=self.limit)
        slots = anyio.Semaphore(self.limit)  # taken by the reading loop, given back by the run's own task
        subscription = Subscription(model=TaskRun, path=SCHEDULED_ROUTE, keys=self.worker.task_keys,
                                    client_id=self.worker.client_id, base_url=get_current_settings().api.url)
        try:
            with anyio.CancelScope() as self._scope:
                async with self.worker, anyio.create_task_group() as group:
                    while True:
                        await slots.acquire()  # room to run one more: only now read one
                        task_run = await anext(subscription)
                        group.start_soon(self._run, task_run, slots)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(RuntimeError):  # RuntimeError: never connected
                # closed now, not when this process ends: until then the server would hand a run to this stopped
                # worker and wait for an acknowledgement that never comes before giving it to another
                await subscription.websocket.close()

    async def _run(self, task_run, slots) -> None:
        import anyio

        try:
            if task_run.id in self._in_flight:  # the server sent it again (a missed acknowledgement): running here
                return
            self._in_flight.add(task_run.id)
            # taken off the server: a lease that lapses if this process dies, renewed until the run is done here
            await anyio.to_thread.run_sync(start_worker_lease, task_run.id)
            try:
                await self.worker.execute_task_run(task_run)
            except anyio.get_cancelled_exc_class():
                # stop(): the task's thread may still be computing (Prefect runs a sync task in a thread that a
                # cancellation does not stop), so the lease keeps being renewed until this process ends
                self._in_flight.discard(task_run.id)
                raise
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(end_worker_lease, task_run.id)
            self._in_flight.discard(task_run.id)
        finally:
            slots.release()

    async def stop(self) -> None:
        """Stop reading task runs. A task run in flight here keeps its lease while this process lives (its thread
        finishes the shard); once the process is gone the lease lapses and the flow submits the shard again."""
        if self._scope is not None:
            self._scope.cancel()


@dataclass
class Outcome:
    """What a batch of shards on the workers gave: results in submission order, the final states, and the
    shards submitted again because their worker was lost."""

    results: list
    states: list
    resubmitted: list[dict] = field(default_factory=list)

    @property
    def hits(self) -> int:
        return sum(s.name == "Cached" for s in self.states)


@dataclass
class _Watch:
    """The lease renewals seen of one running task run, on this process's clock."""

    beat: int | None = None
    since: float = field(default_factory=time.monotonic)
    worker: str | None = None


def _pages(items: list):
    """`items` in pages of READ_PAGE: the API's page limit (PREFECT_API_DEFAULT_LIMIT, 200)."""
    return (items[start:start + READ_PAGE] for start in range(0, len(items), READ_PAGE))


def _states(client, futures: dict) -> dict:
    """The state of each future's task run (None: created, its first state not recorded yet), by task run id."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterId

    states = {}
    for page in _pages([f.task_run_id for f in futures.values()]):
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=page)), limit=len(page))
        states.update({run.id: run.state for run in runs})
    return states


def _leases(client, task_run_ids: list) -> dict:
    """The lease value of each of these task runs that has one, by task run id."""
    names, leases = {lease_name(i): i for i in task_run_ids}, {}
    for page in _pages(list(names)):
        response = client.request("POST", "/variables/filter", json={"variables": {"name": {"any_": page}},
                                                                      "limit": len(page)})
        response.raise_for_status()
        leases.update({names[v["name"]]: v["value"] for v in response.json() if v["name"] in names})
    return leases


def _lost(lease, watch: _Watch, lease_s: float, scheduled: bool = False) -> bool:
    """Whether a task run's lease went unrenewed for lease_s (its worker is gone, or hung). A Scheduled run
    without a lease is waiting for a worker, never lost; one with a lease was taken by a worker (leases.RECEIVED)
    that has not started it within lease_s."""
    beat = lease.get("beat") if isinstance(lease, dict) else None  # None: not taken yet, or just given back
    if scheduled and beat is None:
        watch.beat, watch.since = None, time.monotonic()
        return False
    if beat != watch.beat:
        watch.beat, watch.since = beat, time.monotonic()
        watch.worker = lease.get("worker") if isinstance(lease, dict) else watch.worker
    return time.monotonic() - watch.since > lease_s


def _give_up(client, task_run_id, watch: _Watch, lease_s: float) -> None:
    from prefect.states import Crashed
    from prefect.variables import Variable

    client.set_task_run_state(task_run_id, Crashed(message=f"dpo-eval: worker {watch.worker or '?'} lost (no lease "
                                                   f"renewal for {lease_s:g} s); shard submitted again"), force=True)
    Variable.unset(lease_name(task_run_id))


def run_on_workers(task, calls: list[dict], sizes: list[int], lease_s: float, stage: str, unit: str,
                   logger=None) -> Outcome:
    """Submit `task(**call, lease_s=...)` for every call to the task workers and wait for all; a call whose
    worker is lost is submitted again (the cache key is the same, so work already stored is not redone)."""
    from dpo_eval.flows.progress import stage_progress
    from prefect import get_client

    futures = {i: task.delay(**call, lease_s=lease_s) for i, call in enumerate(calls)}
    watches: dict = {}
    final: dict = {}
    resubmitted: list[dict] = []
    with get_client(sync_client=True) as client, stage_progress(stage, sum(sizes), unit) as progress:
        _warn_without_workers(client, task, logger)
        while len(final) < len(calls):
            states = _states(client, {i: f for i, f in futures.items() if i not in final})
            leases = _leases(client, [s for s, state in states.items() if state is not None and not state.is_final()])
            for i, future in futures.items():
                if i in final:
                    continue
                if future.task_run_id not in states:
                    raise DpoEvalError(f"{stage} shard {i}: its task run {future.task_run_id} was deleted, as a worker "
                                       "does when it cannot read the task's parameters: every dpo-eval worker and the "
                                       "flow must share one result storage (the same PREFECT_RESULTS_LOCAL_STORAGE_PATH "
                                       "on a shared volume, or PREFECT_DEFAULT_RESULT_STORAGE_BLOCK); finished shards "
                                       "are kept, so run again once the workers are fixed")
                state = states[future.task_run_id]
                if state is None:  # created, its first state not yet recorded by the server: look again next round
                    continue
                if state.is_final():
                    final[i] = state
                    progress.advance(sizes[i])
                elif state.is_running() or state.is_scheduled():
                    watch = watches.setdefault(future.task_run_id, _Watch())
                    if _lost(leases.get(future.task_run_id), watch, lease_s, scheduled=state.is_scheduled()):
                        _give_up(client, future.task_run_id, watch, lease_s)
                        if sum(r["call"] == i for r in resubmitted) >= MAX_RESUBMITS:
                            raise DpoEvalError(
                                f"{stage} shard {i} lost its worker {MAX_RESUBMITS + 1} times (last: {watch.worker}); "
                                "stopped rather than hand it out again. Look at the workers' logs (out of memory, a "
                                "hung GPU: worker_stall_s, a lease too short for them: worker_lease_s); finished "
                                "shards are kept, so run again once that is fixed")
                        resubmitted.append({"call": i, "task_run": str(future.task_run_id), "worker": watch.worker})
                        if logger is not None:
                            logger.warning("%s shard %d: worker %s lost; submitted again", stage, i, watch.worker)
                        futures[i] = task.delay(**calls[i], lease_s=lease_s)
            if len(final) < len(calls):
                time.sleep(POLL_S)
    results = [futures[i].result() for i in range(len(calls))]
    return Outcome(results, [final[i] for i in range(len(calls))], resubmitted)


def _warn_without_workers(client, task, logger) -> None:
    """A run waits for workers that may come later; say so where none is connected now."""
    if logger is None:
        return
    response = client.request("POST", "/task_workers/filter",
                              json={"task_worker_filter": {"task_keys": [task.task_key]}})
    if response.status_code == 200 and not response.json():
        logger.warning("no dpo-eval worker is connected for %s: shards wait until one starts (`dpo-eval worker` "
                       "with this PREFECT_API_URL and the shared result storage)", task.name)
