"""Run the server: bind, preload, serve with uvicorn, and shut down cleanly on SIGINT / SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from mlxman.errors import EXIT_FAILURE, ServerError, UsageError
from mlxman.memory import Budget, format_bytes
from mlxman.server.security import split_key
from mlxman.settings import (
    DEFAULT_ADAPTER_SLOTS,
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_MODELS,
    DEFAULT_MAX_QUEUE,
)

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from mlxman.server.state import ServerState

# After a stop signal, model work is told to stop at its next token or prompt chunk, which can take seconds
# on a CPU; open requests get this long to send their last event before uvicorn cuts them off.
GRACEFUL_SHUTDOWN_SECONDS = 30
# Then the worker threads get this long to end before the pool is closed (failing that, the process leaves).
THREAD_DRAIN_SECONDS = 30.0

Narrate = Callable[[str], None]


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    budget: Budget
    keep_alive: float
    keep_alive_spec: str
    preload: Sequence[str] = ()
    roots: Sequence[Path] = ()
    api_key: str | None = None
    admin_key: str | None = None
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    max_models: int = DEFAULT_MAX_MODELS
    adapter_slots: int = DEFAULT_ADAPTER_SLOTS
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_batch: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE


def setup_logging() -> None:
    """Request lines and server events go to stderr, one line each."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name, level in (("mlxman.server", logging.INFO), ("uvicorn.error", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(level)
        logger.propagate = False


def bind(host: str, port: int) -> socket.socket:
    """Listen before the slow part (preloading), so a busy port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(
            f"Cannot resolve host {host!r}: {exc}", "pass --host with an IP address or name"
        ) from None
    family, kind, proto, _, address = infos[0]
    # The protocol number matters: asyncio turns Nagle off (TCP_NODELAY) only on sockets marked IPPROTO_TCP,
    # and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ServerError(
            f"Cannot listen on {host}:{port}: {exc.strerror or exc}",
            "stop the other server on that port, or pass another --port",
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(options: ServeOptions, narrate: Narrate) -> NoReturn:
    """Serve until SIGINT or SIGTERM, close the pool (models freed), and end the process (exit code 0)."""
    try:
        import uvicorn  # noqa: F401  (checked here: a missing extra is a usage error)

        from mlxman.server.app import create_app
    except ImportError as exc:
        raise UsageError(
            f"The server needs packages that are not installed ({exc.name})", 'pip install "mlxman[server]"'
        ) from None
    from mlxman.engine.hosting import EngineSettings
    from mlxman.pool import ModelPool
    from mlxman.server.state import ServerConfig

    setup_logging()
    sock = bind(options.host, options.port)
    pool = ModelPool(
        options.budget.limit_bytes,
        keep_alive=options.keep_alive,
        context_tokens=options.context_tokens,
        max_models=options.max_models,
    )
    state: ServerState | None = None
    try:
        for key in options.preload:
            model, adapter = split_key(key)
            narrate(f"Loading {key}")
            entry = pool.load(model, adapter, pin=True, keep_alive=-1)
            narrate(f"Loaded {entry.key} ({entry.kind}, {format_bytes(entry.accounted_bytes)}, pinned)")
        budget = {"spec": options.budget.spec, "source": options.budget.source}
        config = ServerConfig(
            host=options.host,
            port=options.port,
            api_key=options.api_key,
            admin_key=options.admin_key,
            roots=options.roots,
            budget=budget,
            engine=EngineSettings(
                adapter_slots=options.adapter_slots,
                max_lora_rank=options.max_lora_rank,
                max_rows=options.max_batch,
                max_queue=options.max_queue,
            ),
        )
        app = create_app(pool, config)
        state = app.state.server
        server = uvicorn_server(app)
        host = f"[{options.host}]" if ":" in options.host else options.host
        limit = format_bytes(options.budget.limit_bytes)
        narrate(
            f"Serving on http://{host}:{options.port} (pool limit {limit}, "
            f"keep-alive {options.keep_alive_spec}); stop with Ctrl-C"
        )
        with _signals_recorded():
            server.run(sockets=[sock])
        narrate("Stopping: waiting for model work to end")
    finally:
        sock.close()
        if state is not None and not state.close(THREAD_DRAIN_SECONDS):
            # A worker still holds a lease: unloading under it, or tearing down while MLX computes in it,
            # would crash the process. Leave at once instead.
            narrate(f"Model work did not stop within {THREAD_DRAIN_SECONDS:.0f} s; exiting without unloading")
            _leave(EXIT_FAILURE)
        # Every worker has ended, so no lease is held: the pool can unload everything.
        pool.close()
    narrate("Stopped")
    _leave(0)


def _leave(code: int) -> NoReturn:
    """Exit now, without the interpreter's teardown.

    With MLX 0.32, a process whose worker threads sampled with mlx-lm's compiled sampler aborts in that
    teardown about one time in three (exit code 134, "terminate called without an active exception"): the
    compiled graphs and random state made on those threads outlive them. All is closed and flushed by now.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def uvicorn_server(app: FastAPI) -> uvicorn.Server:
    """uvicorn serving ``app``; its shutdown first ends the model work, then waits for connections as usual.

    Without that first step, uvicorn waits for open requests (which wait for the model), then cuts them off:
    queued requests got a plain-text 500 and streams no final event. Here queued requests get a JSON 503, and
    running generations stop at their next token or prompt chunk with an error event, within the grace period.
    """
    import uvicorn

    state: ServerState = app.state.server

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            state.begin_shutdown()
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        lifespan="on",
    )
    return Server(config)


@contextmanager
def _signals_recorded() -> Iterator[None]:
    """uvicorn re-raises the stop signal after its own shutdown: record it instead, so the process exits 0."""

    def record(sig: int, frame: FrameType | None) -> None:
        pass

    old = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
