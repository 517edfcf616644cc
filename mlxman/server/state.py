"""What every route shares: the pool, the server's settings, the path policy and the running generations."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlxman.errors import MlxmanError
from mlxman.server.jobs import GenerationJob
from mlxman.server.security import PathPolicy
from mlxman.settings import DEFAULT_HOST, DEFAULT_PORT

if TYPE_CHECKING:
    from mlxman.pool import ModelPool

# Generations waiting or running at once; beyond it a request gets 503 (retry later), not an unbounded queue.
MAX_PENDING_GENERATIONS = 64
# How often idle entries past their keep-alive are unloaded.
EXPIRE_INTERVAL_SECONDS = 1.0
# Largest request body accepted.
MAX_BODY_BYTES = 16 * 1024 * 1024


class ServerBusy(MlxmanError):
    """Too many generations are queued."""


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
    budget: dict[str, Any] = field(default_factory=dict)


class ServerState:
    def __init__(self, pool: ModelPool, config: ServerConfig) -> None:
        self.pool = pool
        self.config = config
        self.policy = PathPolicy(config.roots)
        self.jobs: set[GenerationJob] = set()
        self.started = time.time()

    def admit(self, job: GenerationJob) -> None:
        if len(self.jobs) >= self.config.max_pending:
            raise ServerBusy(
                f"{len(self.jobs)} generations are already waiting or running", "retry in a moment"
            )
        self.jobs.add(job)

    def release(self, job: GenerationJob) -> None:
        self.jobs.discard(job)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel()

    def drain(self, timeout: float) -> None:
        """Cancel every generation and wait (up to ``timeout`` in all) for their threads to end."""
        deadline = time.monotonic() + timeout
        for job in list(self.jobs):
            job.cancel()
            job.join(max(deadline - time.monotonic(), 0.0))
