"""Model work runs on a fixed set of long-lived threads: flat thread count, cheap routes never starved."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from mlxman.demo import DemoKit
from tests.server_harness import Server, running_server, wait_until

pytestmark = pytest.mark.slow

# Headroom over the warm thread count: uvicorn's and anyio's thread pools grow and shrink with load.
THREAD_SLACK = 8


@pytest.fixture(scope="module")
def server(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("workers-logs")
    args = ["--adapter-root", str(demo_kit.root), "--preload", str(demo_kit.model)]
    with running_server(logs, *args, "--preload", str(demo_kit.embeddings_model)) as srv:
        yield srv


def names(kit: DemoKit) -> list[str]:
    return [str(kit.model), *(f"{kit.model}::{path}" for path in kit.adapters.values())]


def complete(server: Server, model: str, max_tokens: int = 2) -> httpx.Response:
    body = {"model": model, "prompt": "red", "max_tokens": max_tokens, "temperature": 0}
    return server.post("/v1/completions", body)


def test_thread_count_stays_flat_over_hundreds_of_requests(server: Server, demo_kit: DemoKit) -> None:
    process = psutil.Process(server.process.pid)
    models = names(demo_kit)

    def one(i: int) -> int:
        return complete(server, models[i % len(models)]).status_code

    with ThreadPoolExecutor(max_workers=4) as executor:
        assert set(executor.map(one, range(40))) == {200}  # warm-up: every adapter, every worker
        warm = process.num_threads()
        samples = []
        for _ in range(6):
            assert set(executor.map(one, range(50))) == {200}
            samples.append(process.num_threads())
    assert max(samples) <= warm + THREAD_SLACK, f"threads grew from {warm}: {samples}"


def test_cheap_routes_answer_while_model_work_is_queued(server: Server, demo_kit: DemoKit) -> None:
    """One long embedding holds its model; 44 more and 8 generations queue; /health and /v1/models answer."""
    model = str(demo_kit.embeddings_model)
    # Short texts (within the demo BERT's 128 positions), many of them: one request that keeps its model busy.
    heavy_body = {"model": model, "input": [" ".join(["red green blue yellow"] * 24)] * 2048}
    with ThreadPoolExecutor(max_workers=53) as executor:
        heavy = executor.submit(server.post, "/v1/embeddings", heavy_body)
        wait_until(
            lambda: any(e["in_use"] for e in server.pool()["entries"] if e["key"] == model),
            120,
            "the long embedding to hold its model",
        )
        queued = [executor.submit(server.post, "/v1/embeddings", {"model": model, "input": "red"})]
        queued += [
            executor.submit(server.post, "/v1/embeddings", {"model": model, "input": "red"})
            for _ in range(43)
        ]
        queued += [executor.submit(complete, server, names(demo_kit)[i % 4], 64) for i in range(8)]
        health = httpx.get(server.url + "/health", timeout=120)
        models = server.get("/v1/models")
        # The thread pool that serves cheap routes is not where model work waits: they answered at once.
        assert not heavy.done(), "the cheap routes answered only once the model was free again"
        assert health.status_code == 200 and models.status_code == 200
        assert heavy.result().status_code == 200
        assert {f.result().status_code for f in queued} == {200}
