"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, request log and keep-alive expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxman.engine.scheduler import EngineBusy, EngineClosed
from mlxman.errors import MlxmanError
from mlxman.pool import ModelPool
from mlxman.server import admin_routes, openai_routes
from mlxman.server.errors import describe, user_data_error
from mlxman.server.schemas import error_body
from mlxman.server.security import ADMIN_SCOPE_KEY, HostNotAllowed, check_bearer, host_name, is_loopback
from mlxman.server.state import ServerBusy, ServerConfig, ServerState

log = logging.getLogger("mlxman.server")


def error_response(exc: MlxmanError) -> JSONResponse:
    status, body = describe(exc)
    # Tell OpenAI clients not to retry what will fail again; a busy server is worth a retry.
    headers = {} if isinstance(exc, ServerBusy | EngineBusy | EngineClosed) else {"x-should-retry": "false"}
    if isinstance(exc, EngineBusy):
        headers["Retry-After"] = str(exc.retry_after)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


# Paths anyone may call, without a key: a load balancer's or a script's liveness probe.
PUBLIC_PATHS = frozenset({"/health"})


def create_app(pool: ModelPool, config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``pool``; the caller owns the pool (and closes it after the app stops)."""
    state = ServerState(pool, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        expiry = asyncio.create_task(_expire_forever(state))
        try:
            yield
        finally:
            state.begin_shutdown()
            expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expiry

    app = FastAPI(
        title="mlxman",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    # The API key is checked by the Gate middleware, before any body is read.
    app.include_router(admin_routes.health_router)
    app.include_router(admin_routes.router)
    app.include_router(admin_routes.server_router)
    app.include_router(openai_routes.router)

    @app.exception_handler(MlxmanError)
    async def _mlxman_error(request: Request, exc: MlxmanError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        param = ".".join(str(p) for p in problems[0].get("loc", ())[1:]) if problems else None
        message = "; ".join(_describe(p) for p in problems[:5]) or "Invalid request body"
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_request", param or None),
            status_code=400,
            headers={"x-should-retry": "false"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return too_large(state.config.max_body_bytes)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, type_, None), status_code=exc.status_code)

    # Added innermost first: RequestLog sees every answer, AnswerEveryError every exception, and the Gate runs
    # before any route reads a body.
    app.add_middleware(Gate, config=state.config)
    app.add_middleware(AnswerEveryError)
    app.add_middleware(RequestLog)
    return app


def _describe(problem: Any) -> str:
    where = ".".join(str(p) for p in problem.get("loc", ())[1:]) or "body"
    return f"{where}: {problem.get('msg', 'invalid')}"


async def _expire_forever(state: ServerState) -> None:
    """Unload idle entries whose keep-alive ran out; a failure is logged, never fatal."""
    while True:
        await asyncio.sleep(state.config.expire_interval)
        try:
            expired = await state.expire()
        except Exception:
            log.exception("keep-alive expiry failed")
            continue
        for key in expired:
            log.info("unloaded %s (keep-alive expired)", key)


def too_large(max_bytes: int) -> JSONResponse:
    body = error_body(f"Request body over {max_bytes} bytes", "invalid_request_error", "request_too_large")
    return JSONResponse(body, status_code=413, headers={"x-should-retry": "false"})


class Gate:
    """What is checked before a body is read: the Host header (on loopback), the API key, the body size.

    The key comes first so that an unauthenticated caller cannot make the server read (or parse) anything.
    """

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config
        self.loopback = is_loopback(config.host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        try:
            if self.loopback:
                self._check_host(headers.get(b"host", b"").decode("latin-1"))
            admin = False
            if scope["path"] not in PUBLIC_PATHS:
                authorization = headers.get(b"authorization", b"").decode("latin-1")
                admin = check_bearer(authorization, self.config.api_key, self.config.admin_key)
        except MlxmanError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[ADMIN_SCOPE_KEY] = admin
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await too_large(limit)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                # FastAPI passes an HTTPException raised while reading the body through as it is (-> 413).
                raise StarletteHTTPException(413, f"Request body over {limit} bytes")
            return message

        await self.app(scope, counted, send)

    @staticmethod
    def _check_host(header: str) -> None:
        """On a loopback server, refuse other host names (DNS rebinding from a web page)."""
        name = host_name(header)
        if name is not None and not is_loopback(name):
            raise HostNotAllowed(
                f"Host {header!r} is not allowed: this server listens on loopback only",
                "address it as 127.0.0.1, ::1 or localhost",
            )


class AnswerEveryError:
    """Answer an exception no handler took, and keep the connection.

    Starlette's last-resort handler re-raises after answering, and uvicorn then drops the connection: a client
    on a keep-alive connection would see its next request reset.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if started:
                raise  # mid-stream: only closing the connection tells the client the answer is cut
            if user_data_error(exc) is None:
                log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            status, body = describe(exc)
            await JSONResponse(body, status_code=status)(scope, receive, send)


class RequestLog:
    """One stderr line per request once its response has been sent (streams included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def logged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            detail = scope.get("state", {}).get("log_detail", "")
            log.info(
                "%s %s %s %s %.3fs%s",
                client[0],
                scope["method"],
                scope["path"],
                status or "disconnected",
                time.perf_counter() - started,
                f" {detail}" if detail else "",
            )
