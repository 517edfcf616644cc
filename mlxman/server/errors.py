"""mlxman errors as HTTP answers: status code and OpenAI-shaped body."""

from __future__ import annotations

from typing import Any

from mlxman.engine.scheduler import EngineBusy, EngineClosed
from mlxman.errors import (
    AdapterError,
    ContextError,
    InUseError,
    MemoryBudgetError,
    MlxmanError,
    ModelError,
    NotFoundError,
    ServerError,
    UsageError,
)
from mlxman.server.schemas import error_body
from mlxman.server.security import (
    MAX_NAME_CHARS,
    AccessDenied,
    HostNotAllowed,
    Unauthorized,
    is_name_too_long,
)
from mlxman.server.state import ServerBusy

# Error class -> (HTTP status, OpenAI error type, code); the first match wins, so subclasses come first.
ERROR_TABLE: tuple[tuple[type[MlxmanError], int, str, str], ...] = (
    (Unauthorized, 401, "authentication_error", "invalid_api_key"),
    (AccessDenied, 403, "permission_error", "path_not_allowed"),
    (HostNotAllowed, 403, "permission_error", "host_not_allowed"),
    (NotFoundError, 404, "not_found_error", "model_not_found"),
    (InUseError, 409, "invalid_request_error", "in_use"),
    (MemoryBudgetError, 503, "server_error", "memory_budget"),
    # The model's engine queue is full: retry after the Retry-After header's seconds.
    (EngineBusy, 429, "rate_limit_error", "queue_full"),
    (EngineClosed, 503, "server_error", "engine_closed"),
    (ServerBusy, 503, "server_error", "server_busy"),
    (AdapterError, 400, "invalid_request_error", "adapter_error"),
    (ModelError, 400, "invalid_request_error", "model_error"),
    # OpenAI's code for a prompt that does not fit, so clients can tell it apart.
    (ContextError, 400, "invalid_request_error", "context_length_exceeded"),
    (UsageError, 400, "invalid_request_error", "invalid_request"),
    (ServerError, 500, "server_error", "server_error"),
    (MlxmanError, 500, "server_error", "server_error"),
)


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for an error; anything unexpected is a 500 that names the exception."""
    # A task group wraps what one task raised; the error is what the task raised.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    exc = user_data_error(exc) or exc
    if isinstance(exc, MlxmanError):
        status, type_, code = next((s, t, c) for cls, s, t, c in ERROR_TABLE if isinstance(exc, cls))
        # `message` is what OpenAI clients show; `detail` and `hint` let mlxman's client rebuild the error.
        return status, error_body(str(exc), type_, code, detail=exc.message, hint=exc.hint)
    return 500, error_body(f"Internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")


def user_data_error(exc: BaseException) -> MlxmanError | None:
    """Errors that only a request's own data causes, where a reader let them escape: a 400, not a 500."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, RecursionError):
        return UsageError(
            "A file the request named nests too deeply to read",
            "check the model's or adapter's JSON files (config.json, tokenizer files)",
        )
    if is_name_too_long(exc):
        return UsageError(
            f"A path in the request has a name over {MAX_NAME_CHARS} characters",
            f"file and folder names are at most {MAX_NAME_CHARS} characters long",
        )
    return None
