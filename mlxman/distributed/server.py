"""``mlxman serve --hosts``: one sharded model and its adapters behind an OpenAI-compatible HTTP API.

The HTTP server lives in the launching process on rank 0's machine; the ranks run under ``mlx.launch`` and
take one request at a time. A rank that dies ends the request it was running with an error; the server keeps
answering, says why the ranks are down (``/health``), and starts them again for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from mlxman.distributed.launch import RankGroup, ShardedJob
from mlxman.engine.events import StopMatcher
from mlxman.errors import ContextError, DistributedError, MlxmanError, NotFoundError, UsageError
from mlxman.generate import GenerationRequest
from mlxman.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from mlxman.server.security import check_bearer
from mlxman.settings import DEFAULT_MAX_TOKENS

_STATUS: dict[type[MlxmanError], tuple[int, str]] = {
    NotFoundError: (404, "not_found_error"),
    ContextError: (400, "invalid_request_error"),
    UsageError: (400, "invalid_request_error"),
}


def _error(exc: MlxmanError) -> JSONResponse:
    status, kind = next(
        ((s, k) for cls, (s, k) in _STATUS.items() if isinstance(exc, cls)), (503, "server_error")
    )
    return JSONResponse(error_body(str(exc), kind), status_code=status)


@dataclass
class ShardedService:
    """The rank group of one model, asked one request at a time and started again after it went down."""

    job: ShardedJob
    model_id: str
    group: RankGroup | None = None
    loaded_rows: list[dict[str, Any]] = field(default_factory=list)
    last_rows: list[dict[str, Any]] = field(default_factory=list)
    share_rows: list[dict[str, Any]] = field(default_factory=list)
    last_error: str | None = None
    in_use: int = 0
    # Requests asked for and not yet answered, those whose client left (or hit a stop sequence), and
    # whether the server is stopping (it cancels what runs and refuses what waits).
    active: set[str] = field(default_factory=set)
    cancelled: set[str] = field(default_factory=set)
    stopping: bool = False
    narrate: Callable[[str], None] = field(default=lambda _m: None)
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ids(self) -> list[str]:
        return [self.model_id] + [f"{self.model_id}::{a}" for a in self.job.adapters if a]

    def adapter_of(self, name: str) -> str | None:
        """The declared adapter that a request's ``model`` names: ``MODEL::ADAPTER``, by path or folder."""
        model, _, adapter = name.partition("::")
        if model not in (self.model_id, str(self.job.model_dir), self.job.model_dir.name):
            raise NotFoundError(f"Model {model!r} is not served here", f"use one of {', '.join(self.ids())}")
        if not adapter:
            return None
        for declared in self.job.adapters:
            if declared and adapter in (declared, Path(declared).name):
                return declared
        raise NotFoundError(
            f"Adapter {adapter!r} was not loaded with this sharded model",
            f"use one of {', '.join(self.ids())}",
        )

    def start(self) -> None:
        """Start the ranks when they are not running (the first request after a failure comes here)."""
        if self.group is not None and self.group.up:
            return
        if self.group is not None:
            self.group.close()
        group = RankGroup(self.job)
        try:
            group.start(self._note)
        except MlxmanError as exc:
            self.last_error = str(exc)
            raise
        self.group = group

    def _note(self, event: dict[str, Any]) -> None:
        if event["event"] == "shares":
            self.share_rows = list(event["rows"])
        elif event["event"] == "loaded":
            self.loaded_rows = list(event["rows"])
        elif event["event"] == "answer_end":
            self.last_rows = list(event["rows"])

    def ask(
        self,
        adapter: str | None,
        request: dict[str, Any],
        on_text: Any,
        request_id: str = "",
        stops: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Run one request on every rank; the stats of rank 0's answer.

        Stop sequences are found in rank 0's text, as on one machine; the text is cut there and the ranks
        are asked to stop, which they do together at their next agreed check.
        """
        done: dict[str, Any] = {}
        matcher = StopMatcher(stops)
        hit = False

        def on_event(event: dict[str, Any]) -> None:
            nonlocal hit
            self._note(event)
            if event["event"] == "text" and not hit:
                ready, hit = matcher.feed(event["text"])
                if ready:
                    on_text(ready)
                if hit:
                    self.cancel(request_id)
            elif event["event"] == "answer_end":
                done.update(event["stats"])

        self.in_use += 1
        self.active.add(request_id)
        try:
            with self.lock:
                if self.stopping:
                    raise _stopping()
                if request_id in self.cancelled:  # its client left while it waited
                    self.narrate(f"{request_id}: cancelled before it started")
                    return {"finish_reason": "cancelled", "generation_tokens": 0}
                self.start()
                assert self.group is not None
                try:
                    self.group.ask(adapter, request, on_event, request_id)
                except MlxmanError as exc:
                    if not getattr(exc, "request_only", False):
                        self.last_error = str(exc)
                    self.narrate(f"{request_id or 'request'}: {exc}")
                    raise
            if hit:
                done["finish_reason"] = "stop"
            else:
                rest = matcher.flush()
                if rest:
                    on_text(rest)
        finally:
            self.in_use -= 1
            self.active.discard(request_id)
            self.cancelled.discard(request_id)
        tokens, reason = done.get("generation_tokens"), done.get("finish_reason")
        self.narrate(f"{request_id or 'request'}: {tokens} tokens, {reason}")
        if self.stopping and reason == "cancelled":
            raise _stopping()
        return done

    def cancel(self, request_id: str) -> None:
        """Stop a request whose client left (the ranks agree on the token to stop at); one that still
        waits for the ranks is dropped when its turn comes."""
        if request_id not in self.active:
            return
        self.cancelled.add(request_id)
        if self.group is not None:
            self.group.cancel(request_id)

    def admit(self, request_id: str) -> None:
        """Count a request as asked for before it reaches a worker thread, so that a cancel finds it."""
        self.active.add(request_id)

    def stop_all(self) -> None:
        """The server is stopping: what runs ends at the ranks' next check, what waits is refused."""
        self.stopping = True
        for request_id in list(self.active):
            self.cancel(request_id)

    def ranks(self) -> list[dict[str, Any]]:
        """A row per rank: host, weights (estimated and measured), KV, adapter, MLX active memory, budget."""
        rows: dict[int, dict[str, Any]] = {}
        for source in (self.share_rows, self.loaded_rows, self.last_rows):
            for r in source:
                rows.setdefault(r["rank"], {}).update(r)
        return [rows[k] for k in sorted(rows)]

    def pool(self) -> dict[str, Any]:
        """The sharded model in the shape of a pool's status (what `pool status` and `status` show)."""
        ranks = self.ranks()
        weights = sum(int(r.get("weights_bytes", 0)) for r in ranks)
        measured = sum(int(r.get("measured_bytes", 0)) for r in ranks)
        kv = sum(int(r.get("kv_bytes", 0)) for r in ranks)
        budget = sum(int(r.get("budget_bytes", 0)) for r in ranks)
        entry = {"kind": "text", "parent": None, "context_tokens": self.job.context_tokens, "pinned": True}
        entries = [
            {
                **entry,
                "key": self.model_id,
                "estimated_bytes": weights,
                "measured_bytes": measured,
                "kv_bytes": kv,
                "in_use": self.in_use,
            }
        ]
        for a in self.job.adapters:
            if a:
                entries.append(
                    {
                        **entry,
                        "key": f"{self.model_id}::{a}",
                        "parent": self.model_id,
                        "estimated_bytes": 0,
                        "in_use": 0,
                    }
                )
        used = max(weights, measured) + kv
        return {
            "entries": entries,
            "used_bytes": used,
            "budget_bytes": budget,
            "free_bytes": max(budget - used, 0),
            "model_count": 1,
            "max_models": 1,
            "context_tokens": self.job.context_tokens,
            "available_bytes": sum(int(r.get("available_bytes", 0)) for r in ranks),
            "budget": {"spec": f"sum over {len(ranks)} ranks", "source": "each host"},
            "ranks": ranks,
        }

    def server(self) -> dict[str, Any]:
        """This process and, for MLX memory, the ranks' totals (the weights live there, not here)."""
        import dataclasses

        from mlxman import __version__
        from mlxman.system import process_info

        ranks = self.ranks()
        mlx = {
            "active_memory": sum(int(r.get("active_bytes", 0)) for r in ranks),
            "peak_memory": sum(int(r.get("peak_bytes", r.get("active_bytes", 0))) for r in ranks),
            "cache_memory": 0,
            "memory_limit": sum(int(r.get("budget_bytes", 0)) for r in ranks),
        }
        return {
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started, 3),
            **dataclasses.asdict(process_info()),
            "mlx": mlx,
            "ranks": ranks,
        }

    def health(self) -> dict[str, Any]:
        up = self.group is not None and self.group.up
        return {
            "status": "ok" if up else "down",
            "model": self.model_id,
            "shard": self.job.mode,
            "backend": self.job.hostfile.backend,
            "error": None if up else self.last_error,
            "ranks": self.ranks(),
        }

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def _stopping() -> DistributedError:
    return DistributedError("The server is stopping", "send the request again once it is back")


def _generation(body: SamplingFields) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "max_tokens": body.token_limit() or DEFAULT_MAX_TOKENS,  # type: ignore[attr-defined]
        "temperature": body.temperature if body.temperature is not None else 0.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "seed": body.seed,
        "truncate_prompt_tokens": body.truncate_prompt_tokens,
    }
    if isinstance(body, ChatCompletionRequest):
        fields["messages"] = [{"role": m.role, "content": m.text()} for m in body.messages]
    else:
        assert isinstance(body, CompletionRequest)
        fields.update(prompt=body.prompt_text(), raw=True)
    GenerationRequest(**fields).check()
    return fields


def create_sharded_app(service: ShardedService, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="mlxman (sharded)")

    @app.middleware("http")
    async def key_check(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path != "/health":
            try:
                check_bearer(request.headers.get("authorization"), api_key)
            except MlxmanError as exc:
                return JSONResponse(error_body(str(exc), "authentication_error"), status_code=401)
        return await call_next(request)

    @app.exception_handler(MlxmanError)
    async def on_error(_request: Request, exc: MlxmanError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return JSONResponse(
            error_body(f"{where}: {first.get('msg', 'invalid')}", "invalid_request_error"), 400
        )

    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/api/pool")
    def pool() -> dict[str, Any]:
        return service.pool()

    @app.get("/api/server")
    def server() -> dict[str, Any]:
        return service.server()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        data = [{"id": i, "object": "model", "owned_by": "mlxman"} for i in service.ids()]
        return {"object": "list", "data": data}

    async def complete(body: SamplingFields, chat: bool, request: Request) -> Any:
        adapter = service.adapter_of(body.model)
        fields = _generation(body)
        stops = body.stop_sequences()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                _sse(service, adapter, fields, rid, created, body.model, chat, stops, body.include_usage()),
                media_type="text/event-stream",
            )
        pieces: list[str] = []
        # A client that leaves a non-streamed request cancels it too (on every rank, or before it starts).
        service.admit(rid)
        watch = asyncio.create_task(_cancel_on_disconnect(service, request, rid))
        try:
            stats = await asyncio.to_thread(service.ask, adapter, fields, pieces.append, rid, stops)
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        return _whole(rid, created, body.model, chat, "".join(pieces), stats)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await complete(body, True, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await complete(body, False, request)

    return app


async def _cancel_on_disconnect(service: ShardedService, request: Request, rid: str) -> None:
    # A blocking receive, not polling ``is_disconnected``: behind the ``http`` middleware that poll never
    # sees the disconnect (its receive is cancelled before the middleware's task can pass one on).
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.25)
    if rid in service.active:
        service.narrate(f"{rid}: the client left")
    service.cancel(rid)


def _finish(stats: dict[str, Any]) -> str:
    return "length" if stats.get("finish_reason") == "length" else "stop"


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    p, g = int(stats.get("prompt_tokens", 0)), int(stats.get("generation_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


def _whole(
    rid: str, created: int, model: str, chat: bool, text: str, stats: dict[str, Any]
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(stats), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    obj = "chat.completion" if chat else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(stats),
    }


async def _sse(
    service: ShardedService,
    adapter: str | None,
    fields: dict[str, Any],
    rid: str,
    created: int,
    model: str,
    chat: bool,
    stops: Sequence[str] = (),
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events of one request; the generation runs on its own thread, feeding a queue.

    A client that leaves cancels the request on every rank (at their next agreed check), freeing them.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(items.put_nowait, item)

    def work() -> None:
        try:
            put(("end", service.ask(adapter, fields, lambda t: put(("text", t)), rid, stops)))
        except MlxmanError as exc:
            put(("error", exc))

    threading.Thread(target=work, daemon=True).start()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text} if text or finish is None else {}
        else:
            choice["text"] = text
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        while True:
            kind, value = await items.get()
            if kind == "text":
                yield chunk(value, None)
            elif kind == "end":
                finished = True
                yield chunk("", _finish(value))
                if include_usage:  # OpenAI's stream_options.include_usage: one last chunk, no choices
                    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": []}
                    yield f"data: {json.dumps({**body, 'usage': _usage(value)})}\n\n"
                break
            else:
                finished = True
                exc: MlxmanError = value
                yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            service.cancel(rid)


def serve_sharded(service: ShardedService, host: str, port: int, api_key: str | None, narrate: Any) -> None:
    """Start the ranks, then serve until Ctrl-C; the ranks are stopped on the way out."""
    import uvicorn

    from mlxman.server.runner import GRACEFUL_SHUTDOWN_SECONDS, _signals_recorded, bind

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            # Before uvicorn waits for open requests: end the one the ranks run, refuse those that wait.
            service.stop_all()
            await super().shutdown(sockets)

    sock = bind(host, port)
    try:
        with service.lock:
            service.start()
        for row in service.health()["ranks"]:
            narrate(f"rank {row['rank']} ({row['host']}): {row['weights_bytes']:,} bytes of weights")
        narrate(
            f"Serving {service.model_id} sharded over {len(service.job.hostfile.hosts)} ranks on http://{host}:{port}"
        )
        config = uvicorn.Config(
            create_sharded_app(service, api_key),
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )
        with _signals_recorded():
            Server(config).run(sockets=[sock])
        narrate("Stopping the ranks")
    finally:
        service.close()
        sock.close()
    narrate("Stopped")
