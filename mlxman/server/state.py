"""What every route shares: the pool, the settings, the path policy, the model workers and their jobs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mlxman.engine.hosting import Engines, EngineSettings
from mlxman.errors import MlxmanError
from mlxman.server.jobs import CallJob, Job
from mlxman.server.security import PathPolicy
from mlxman.server.workers import WORKER_THREADS, Workers
from mlxman.settings import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from mlxman.pool import ModelPool

T = TypeVar("T")

# Model-bound requests waiting or running at once; beyond it a request gets 503 (retry later).
MAX_PENDING_GENERATIONS = 64
# How often idle entries past their keep-alive are unloaded.
EXPIRE_INTERVAL_SECONDS = 1.0
# Largest request body accepted.
MAX_BODY_BYTES = 16 * 1024 * 1024


class ServerBusy(MlxmanError):
    """Too many model-bound requests are queued."""


class ServerShuttingDown(ServerBusy):
    """The server is stopping: queued and running model work ends with this (HTTP 503)."""


def shutting_down() -> ServerShuttingDown:
    return ServerShuttingDown("The server is shutting down", "retry once it is running again")


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    # Lifts the roots on the admin routes for whoever presents it; see security.check_bearer.
    admin_key: str | None = None
    roots: Sequence[Path] = ()
    max_pending: int = MAX_PENDING_GENERATIONS
    expire_interval: float = EXPIRE_INTERVAL_SECONDS
    max_body_bytes: int = MAX_BODY_BYTES
    workers: int = WORKER_THREADS
    budget: dict[str, Any] = field(default_factory=dict)
    # Text generation on bases whose caches merge runs batched on their engines; None: one request at a time.
    engine: EngineSettings | None = None


class ServerState:
    """Routes run on the event loop; all that touches a model runs on ``workers``, never on a thread pool."""

    def __init__(self, pool: ModelPool, config: ServerConfig) -> None:
        self.pool = pool
        self.config = config
        self.policy = PathPolicy(config.roots)
        self.workers = Workers(config.workers)
        self.engines = Engines(pool, config.engine) if config.engine is not None else None
        self.jobs: set[Job] = set()
        self.closing = False
        self.started = time.time()

    def submit(self, job: Job) -> None:
        """Count ``job`` against the pending limit and queue it for a worker; the caller ``release``s it."""
        if self.closing:
            raise shutting_down()
        if len(self.jobs) >= self.pending_limit:
            raise ServerBusy(f"{len(self.jobs)} requests are already waiting or running", "retry in a moment")
        self.jobs.add(job)
        self.workers.submit(job, shutting_down())

    @property
    def pending_limit(self) -> int:
        """Model-bound requests at once: engines add room for their batches and queues (their own limits)."""
        settings = self.config.engine
        extra = settings.max_rows + settings.max_queue if settings is not None else 0
        return self.config.max_pending + extra

    def cancel(self, job: Job) -> None:
        """Stop ``job``: if it waits in the queue it ends now, else a worker stops it at its next step."""
        job.cancel()
        if self.workers.discard(job):
            job.run()  # cancelled, it does no model work: it only reports its end to whoever waits

    def release(self, job: Job) -> None:
        """The request is over: stop its work and stop counting it."""
        self.cancel(job)
        self.jobs.discard(job)

    async def call(self, lane: str | None, fn: Callable[[], T], *, counted: bool = True) -> T:
        """Run ``fn`` (model work) on a worker and await it; ``counted`` work obeys the pending limit."""
        job = CallJob(lane, fn)
        if counted:
            self.submit(job)
        else:
            self.workers.submit(job, shutting_down())
        try:
            return await job.result()
        finally:
            if counted:
                self.release(job)

    async def expire(self) -> list[str]:
        """Unload entries past their keep-alive; on a worker, since freeing a model touches MLX."""
        try:
            return await self.call(None, self.pool.expire, counted=False)
        except ServerShuttingDown:
            return []

    def begin_shutdown(self) -> None:
        """Refuse new work, fail what is queued, stop what runs at its next step: each with a 503 error."""
        self.closing = True
        error = shutting_down()
        self.workers.fail_queued(error)
        for job in list(self.jobs):
            job.cancel(error)

    def close(self, timeout: float) -> bool:
        """Stop all work and join the worker and engine threads; True when none runs any more (so no lease
        is held and no engine runs a model)."""
        self.begin_shutdown()
        workers_done = self.workers.close(shutting_down(), timeout)
        engines_done = self.engines is None or self.engines.close(shutting_down(), timeout)
        return workers_done and engines_done
