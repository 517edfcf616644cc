"""Start a real ``mlxman serve`` in a child process on a free port, and stop it the way a user would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

# Generous: a cold start imports FastAPI and MLX and may preload models on a busy CPU.
START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    api_key: str | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers(), timeout=120, **kwargs)

    def post(self, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers(), timeout=300, **kwargs)

    def pool(self) -> dict[str, Any]:
        response = self.get("/api/pool")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    def pool_keys(self) -> set[str]:
        return {e["key"] for e in self.pool()["entries"]}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.api_key or "unused", max_retries=0, timeout=300
        )


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail (naming ``what``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def running_server(
    log_dir: Path, *args: str, api_key: str | None = None, env: dict[str, str] | None = None
) -> Iterator[Server]:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    home = log_dir / f"home-{port}"
    home.mkdir(exist_ok=True)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLXMAN_HOME": str(home)}
    for name in ("MLXMAN_HOST", "MLXMAN_MEMORY_LIMIT", "MLXMAN_API_KEY", "MLXMAN_DEBUG"):
        child_env.pop(name, None)
    child_env.update(env or {})
    argv = [sys.executable, "-m", "mlxman", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    if api_key:
        child_env["MLXMAN_TEST_API_KEY"] = api_key
        argv += ["--api-key-env", "MLXMAN_TEST_API_KEY"]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=child_env)
    server = Server(f"http://127.0.0.1:{port}", port, process, log, api_key)

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            return httpx.get(server.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, START_TIMEOUT, "the server to start")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    assert process.returncode == 0, f"server exited with {process.returncode}:\n{server.log_text()}"
    assert "Stopped" in server.log_text()
