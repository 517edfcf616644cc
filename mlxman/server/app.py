"""The FastAPI application: routes, API-key check, OpenAI-shaped errors, request log and keep-alive expiry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxman.errors import MlxmanError, UsageError
from mlxman.pool import ModelPool
from mlxman.server import admin_routes, openai_routes
from mlxman.server.errors import describe
from mlxman.server.schemas import error_body
from mlxman.server.security import check_bearer, is_loopback
from mlxman.server.state import ServerBusy, ServerConfig, ServerState

log = logging.getLogger("mlxman.server")


def error_response(exc: MlxmanError) -> JSONResponse:
    status, body = describe(exc)
    # Tell OpenAI clients not to retry what will fail again; a busy server is worth a retry.
    headers = {} if isinstance(exc, ServerBusy) else {"x-should-retry": "false"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=status, headers=headers)


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def require_key(request: Request) -> None:
    check_bearer(request.headers.get("authorization"), state_of(request).config.api_key)


def create_app(pool: ModelPool, config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``pool``; the caller owns the pool (and closes it after the app stops)."""
    state = ServerState(pool, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        expiry = asyncio.create_task(_expire_forever(state))
        try:
            yield
        finally:
            state.cancel_all()
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
    app.include_router(admin_routes.health_router)
    app.include_router(admin_routes.router, dependencies=[Depends(require_key)])
    app.include_router(openai_routes.router, dependencies=[Depends(require_key)])

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
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, type_, None), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)

    app.add_middleware(BodyLimit, max_bytes=state.config.max_body_bytes)
    if is_loopback(state.config.host):
        app.add_middleware(LoopbackHostOnly)
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
            expired = await asyncio.to_thread(state.pool.expire)
        except Exception:
            log.exception("keep-alive expiry failed")
            continue
        for key in expired:
            log.info("unloaded %s (keep-alive expired)", key)


class BodyLimit:
    """Refuse bodies over ``max_bytes`` (by Content-Length, or by counting a chunked body)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise UsageError(f"Request body over {self.max_bytes} bytes", "send a smaller request")
            return message

        await self.app(scope, counted, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = error_body(
            f"Request body over {self.max_bytes} bytes", "invalid_request_error", "request_too_large"
        )
        await JSONResponse(body, status_code=413)(scope, receive, send)


class LoopbackHostOnly:
    """On a loopback server, refuse requests addressed to other host names (DNS rebinding from a web page)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = urlsplit(f"//{header}").hostname if header else None
            if name is not None and not is_loopback(name):
                body = error_body(
                    f"Host {header!r} is not allowed: this server listens on loopback only",
                    "permission_error",
                    "host_not_allowed",
                )
                await JSONResponse(body, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
