"""6. ``mlxman serve``: warm request latency vs in-process, and aggregate tokens/s with 1, 4, 8 clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Settings, median, ratio, say, settle
from benchmarks.generation import PROMPT
from benchmarks.models import build_model, synthesize_adapter
from benchmarks.startup import mlxman_command

CLIENT_COUNTS = (1, 4, 8)
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    preload: list[str], log: Path, extra: list[str] | None = None, pid: list[int] | None = None
) -> Iterator[str]:
    """``mlxman serve`` as a subprocess on a free port, preloading (and so allowing) ``preload``.

    ``extra`` adds serve flags; ``pid``, when given, receives the server's process id.
    """
    import httpx

    port = free_port()
    argv = [*mlxman_command(), "serve", "--port", str(port), "--keep-alive", "-1", *(extra or [])]
    for key in preload:
        argv += ["--preload", key]
    with tempfile.TemporaryDirectory(prefix="mlxman-bench-home-") as home, log.open("w") as err:
        env = {**os.environ, "MLXMAN_HOME": home, "HF_HUB_OFFLINE": "1"}
        env.pop("MLXMAN_API_KEY", None)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if pid is not None:
            pid.append(proc.pid)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlxman serve exited {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mlxman serve did not answer /health in {START_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
            yield f"{base}/v1"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def _chat(client: Any, model: str, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, temperature=0
    )
    return int(reply.usage.completion_tokens), time.perf_counter() - start


@contextmanager
def in_process(model: Path, adapter: Path, max_tokens: int) -> Iterator[Any]:
    """The same request answered in this process by the pool and TextGeneration, as ``mlxman generate``."""
    from mlxman.answers import Answer, run_answer
    from mlxman.generate import GenerationRequest
    from mlxman.pool import ModelPool

    request = GenerationRequest(prompt=PROMPT, max_tokens=max_tokens)

    def once() -> tuple[int, float]:
        answer = Answer(str(model), str(adapter))
        start = time.perf_counter()
        run_answer(pool, answer, request)
        return answer.stats.generation_tokens, time.perf_counter() - start

    with ModelPool(64 * GIB, keep_alive=-1) as pool:
        once()  # warm-up
        yield once
    settle()


def aggregate(url: str, keys: list[str], clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` threads, each with its own OpenAI client, sending ``per_client`` requests in turn."""

    def one_client(i: int) -> int:
        client = _client(url)
        total = 0
        for j in range(per_client):
            tokens, _ = _chat(client, keys[(i + j) % len(keys)], max_tokens)
            total += tokens
        return total

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one_client, range(clients)))
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * per_client,
        "tokens": tokens,
        "seconds": seconds,
        "tps": tokens / seconds,
    }


def run(settings: Settings) -> dict[str, Any]:
    root = settings.work / "models"
    model = build_model(root, settings.sizes[0], "float16")
    adapters = [synthesize_adapter(model, root / f"{model.name}-lora{i}", seed=100 + i) for i in range(2)]
    keys = [f"{model.resolve()}::{a.resolve()}" for a in adapters]
    n = settings.server_tokens
    with (
        in_process(model, adapters[0], n) as local_once,
        running_server(keys, settings.work / "serve.log") as url,
    ):
        client = _client(url)
        _chat(client, keys[0], n)  # warm-up
        local, remote, paired = [], [], []
        tokens = 0
        for _ in range(settings.repeats):
            # Alternated with in-process runs: both see the same load from other processes.
            tokens, seconds = _chat(client, keys[0], n)
            _, local_seconds = local_once()
            remote.append(seconds)
            local.append(local_seconds)
            paired.append(seconds / local_seconds)
        warm = {
            "max_tokens": n,
            "completion_tokens": tokens,
            "server_s": median(remote),
            "in_process_s": median(local),
            "ratio": median(paired),
        }
        say(
            f"  serve warm request ({tokens} tokens): server {warm['server_s'] * 1000:.0f} ms, in-process "
            f"{warm['in_process_s'] * 1000:.0f} ms -> latency {warm['ratio']:.3f}x in-process"
        )
        scenarios = {"one adapter": keys[:1], "two adapters, alternating": keys}
        concurrency = []
        for label, chosen in scenarios.items():
            for clients in CLIENT_COUNTS:
                row = {
                    "scenario": label,
                    **aggregate(url, chosen, clients, settings.server_requests_per_client, n),
                }
                concurrency.append(row)
                say(
                    f"  serve {label}, {clients} client(s): {row['requests']} requests, "
                    f"{row['tps']:.1f} tok/s aggregate"
                )
    single = n / median(local)
    for row in concurrency:
        row["vs_in_process"] = ratio(row["tps"], single)
    return {"model": model.name, "warm": warm, "in_process_tps": single, "concurrency": concurrency}
