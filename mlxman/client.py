"""A small client for a running ``mlxman serve``: where it listens, and its pool admin API."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mlxman.errors import (
    AdapterError,
    InUseError,
    MemoryBudgetError,
    MlxmanError,
    ModelError,
    NotFoundError,
    ServerError,
    UsageError,
)
from mlxman.settings import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, HOST_ENV

# Admin calls that load a model can take a while; status probes must not.
REQUEST_TIMEOUT = 600.0
PROBE_TIMEOUT = 0.5
# What an HTTP header can carry and every client sends alike: visible ASCII, no spaces.
_KEY_TEXT = re.compile(r"[\x21-\x7e]+")
_KEY_HINT = (
    f"set ${API_KEY_ENV} to the server's key, or pass --api-key-env NAME naming the variable that holds it"
)


class ServerAuthError(ServerError):
    """The server answered 401: it needs an API key, or refused the one sent."""


def check_api_key_text(key: str, source: str) -> None:
    """Refuse a key no client can send: HTTP headers are ASCII, and clients encode them so."""
    if not _KEY_TEXT.fullmatch(key):
        raise UsageError(
            f"The API key in ${source} has characters an HTTP header cannot carry "
            "(non-ASCII letters, spaces or control characters)",
            "use ASCII letters, digits and punctuation only, such as the output of `openssl rand -hex 32`",
        )


def api_key_from_env(
    env_name: str | None = None, default_env: str | None = API_KEY_ENV, flag: str = "--api-key-env"
) -> str | None:
    """The key in the variable ``flag`` names (which must be set), else in ``default_env`` if set."""
    name = env_name or default_env
    if name is None:
        return None
    key = os.environ.get(name, "").strip()
    if env_name and not key:
        raise UsageError(f"{flag} names {env_name}, which is empty or unset", f"export {env_name}=KEY")
    if key:
        check_api_key_text(key, name)
    return key or None


@dataclass(frozen=True)
class Address:
    """Where a server listens."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def parse_address(text: str, source: str = "--host", default_port: int = DEFAULT_PORT) -> Address:
    """``host``, ``host:port``, ``:port`` or ``http://host:port`` (as ``OLLAMA_HOST`` takes them)."""
    raw = text.strip()
    if not raw:
        raise UsageError(f"Empty server address (from {source})", "use host:port, such as 127.0.0.1:11435")
    try:
        parsed = urlsplit(raw if "://" in raw else f"http://{raw}")
    except ValueError:  # an unclosed or invalid [IPv6] literal
        raise UsageError(
            f"Malformed server address {text!r} (from {source})", "use host:port, such as [::1]:11435"
        ) from None
    if parsed.scheme not in ("http", ""):
        raise UsageError(f"Unsupported scheme in {text!r} (from {source})", "mlxman serve speaks plain http")
    try:
        port = parsed.port
    except ValueError:
        raise UsageError(
            f"Invalid port in {text!r} (from {source})", "use a port between 1 and 65535"
        ) from None
    return Address(host=parsed.hostname or DEFAULT_HOST, port=port or default_port)


def server_address(
    flag: str | None = None, fallback: str | None = None, default_port: int = DEFAULT_PORT
) -> Address:
    """The address from the flag, else ``$MLXMAN_HOST``, else ``fallback`` (from config), else the default."""
    if flag:
        return parse_address(flag, "--host", default_port)
    env = os.environ.get(HOST_ENV)
    if env:
        return parse_address(env, HOST_ENV, default_port)
    if fallback:
        return parse_address(fallback, "config file", default_port)
    return Address(DEFAULT_HOST, default_port)


def is_listening(address: Address, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether anything accepts connections there (cheap: no HTTP library needed)."""
    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return True
    except OSError:
        return False


class PoolClient:
    """The admin API of a running server; errors come back as MlxmanError subclasses."""

    def __init__(
        self, address: Address, api_key: str | None = None, timeout: float = REQUEST_TIMEOUT
    ) -> None:
        self.address = address
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.timeout = timeout

    def server(self) -> dict[str, Any]:
        """The server process's MLX counters, RSS and threads."""
        return self._call("GET", "/api/server")

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/pool")

    def load(
        self,
        model: str,
        adapter: str | None = None,
        *,
        pin: bool = False,
        keep_alive: str | None = None,
        kind: str | None = None,
    ) -> dict[str, Any]:
        body = {"model": model, "adapter": adapter, "pin": pin, "keep_alive": keep_alive, "kind": kind}
        return self._call("POST", "/api/pool/load", body)

    def unload(self, key: str) -> dict[str, Any]:
        return self._call("POST", "/api/pool/unload", {"key": key})

    def pin(self, key: str) -> dict[str, Any]:
        return self._call("POST", "/api/pool/pin", {"key": key})

    def unpin(self, key: str) -> dict[str, Any]:
        return self._call("POST", "/api/pool/unpin", {"key": key})

    def estimate(self, model: str, adapters: list[str]) -> dict[str, Any]:
        return self._call("POST", "/api/pool/estimate", {"model": model, "adapters": adapters})

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            import httpx
        except ImportError:
            raise UsageError("Talking to the server needs httpx", 'pip install "mlxman[server]"') from None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            response = httpx.request(
                method, self.address.url + path, json=body, headers=headers, timeout=self.timeout
            )
        except httpx.ConnectError:
            raise ServerError(
                f"No mlxman server is running at {self.address}",
                f"start one with `mlxman serve`, or point --host / ${HOST_ENV} at it",
            ) from None
        except httpx.HTTPError as exc:
            raise ServerError(
                f"The server at {self.address} did not answer: {exc}", "check that it is up"
            ) from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.is_success and isinstance(data, dict):
            return data
        if response.status_code == 401:
            raise ServerAuthError(
                f"The mlxman server at {self.address} "
                + ("refused the API key sent" if self.api_key else "needs an API key"),
                _KEY_HINT,
            )
        raise _error_from(response.status_code, data, self.address)


def _error_from(status: int, data: Any, address: Address) -> MlxmanError:
    """An OpenAI-style error body, back into the matching mlxman error."""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return ServerError(f"HTTP {status} from {address}", "check the server's log")
    # mlxman's server sends the message and the hint apart (`detail`, `hint`); other servers only `message`.
    message = str(error.get("detail") or error.get("message") or f"HTTP {status}")
    hint = error.get("hint")
    cls = _ERRORS_BY_CODE.get(str(error.get("code")))
    if cls is not None:
        return cls(message, hint)
    if status == 403:
        # Not the user's typing but the server's rules (roots, host names): a refusal, not a usage error.
        return ServerError(message, hint)
    if status == 404:
        return NotFoundError(message, hint or "see `mlxman pool status` for what is loaded")
    if 400 <= status < 500:
        return UsageError(message, hint)
    return ServerError(message, hint)


_ERRORS_BY_CODE: dict[str, type[MlxmanError]] = {
    "in_use": InUseError,
    "memory_budget": MemoryBudgetError,
    "model_error": ModelError,
    "adapter_error": AdapterError,
}
