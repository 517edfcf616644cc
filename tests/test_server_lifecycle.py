"""``mlxman serve`` stops cleanly on Ctrl-C even while it streams, and warns when exposed without a key."""

from __future__ import annotations

import signal

import httpx
import pytest

from mlxman.demo import DemoKit
from tests.helpers import run_subprocess
from tests.server_harness import STOP_TIMEOUT, running_server

pytestmark = pytest.mark.slow


def test_ctrl_c_during_a_stream_stops_cleanly(
    demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("lifecycle-logs")
    with running_server(logs, "--preload", str(demo_kit.model)) as server:
        body = {
            "model": str(demo_kit.model),
            "prompt": "red",
            "max_tokens": 20000,
            "temperature": 0.9,
            "stream": True,
        }
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            server.process.send_signal(signal.SIGINT)
            # The server ends the stream (or drops the connection) instead of generating 20000 tokens.
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass
        assert server.process.wait(timeout=STOP_TIMEOUT) == 0
    # running_server checked the exit code (0) and the final "Stopped" line.


def test_unknown_kind_of_address_is_a_usage_error() -> None:
    proc = run_subprocess("serve", "--host", "https://127.0.0.1:1")
    assert proc.returncode == 2 and "Error:" in proc.stderr and "Traceback" not in proc.stderr
