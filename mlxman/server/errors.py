"""mlxman errors as HTTP answers: status code and OpenAI-shaped body."""

from __future__ import annotations

from typing import Any

from mlxman.errors import (
    AdapterError,
    MemoryBudgetError,
    MlxmanError,
    ModelError,
    NotFoundError,
    ServerError,
    UsageError,
)
from mlxman.server.schemas import error_body
from mlxman.server.security import AccessDenied, Unauthorized
from mlxman.server.state import ServerBusy

# Error class -> (HTTP status, OpenAI error type, code); the first match wins, so subclasses come first.
ERROR_TABLE: tuple[tuple[type[MlxmanError], int, str, str], ...] = (
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (AccessDenied, 403, "permission_error", "path_not_allowed"),
    (NotFoundError, 404, "not_found_error", "model_not_found"),
    (MemoryBudgetError, 503, "server_error", "memory_budget"),
    (ServerBusy, 503, "server_error", "server_busy"),
    (AdapterError, 400, "invalid_request_error", "adapter_error"),
    (ModelError, 400, "invalid_request_error", "model_error"),
    (UsageError, 400, "invalid_request_error", "invalid_request"),
    (ServerError, 500, "server_error", "server_error"),
    (MlxmanError, 500, "server_error", "server_error"),
)


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for an error; anything unexpected is a 500 that names the exception."""
    if isinstance(exc, MlxmanError):
        status, type_, code = next((s, t, c) for cls, s, t, c in ERROR_TABLE if isinstance(exc, cls))
        # `message` is what OpenAI clients show; `detail` and `hint` let mlxman's client rebuild the error.
        return status, error_body(str(exc), type_, code, detail=exc.message, hint=exc.hint)
    return 500, error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")
