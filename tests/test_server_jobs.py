"""Worker threads and the jobs they run, in-process: lanes, cancellation at every stage, context limits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.errors import ContextError
from mlxman.generate import GenerationRequest, TextGeneration, fit_context, prompt_tokens
from mlxman.pool import ModelPool
from mlxman.server.jobs import CallJob, Event, Failed, Finished, GenerationJob, Piece, Started
from mlxman.server.state import ServerConfig, ServerShuttingDown, ServerState, shutting_down
from mlxman.server.workers import Workers
from tests.server_models import LONG_CONTEXT, long_context_copy, long_prompt

# -- the workers, with plain Python tasks


class Blocking:
    """A task that runs until released; records when it started and ended."""

    def __init__(self, lane: str | None, log: list[str], name: str) -> None:
        self.lane = lane
        self.log = log
        self.name = name
        self.started = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.log.append(f"start {self.name}")
        self.started.set()
        self.release.wait(30)
        self.log.append(f"end {self.name}")
        self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()


class Raising(Blocking):
    def run(self) -> None:
        self.done.set()
        raise RuntimeError("a bug in a task")


@pytest.fixture
def workers() -> Iterator[Workers]:
    pool = Workers(3)
    yield pool
    pool.close(RuntimeError("closed"), 10)


def test_a_lane_runs_one_task_at_a_time_and_other_lanes_pass_it(workers: Workers) -> None:
    log: list[str] = []
    first, second, other = Blocking("a", log, "a1"), Blocking("a", log, "a2"), Blocking("b", log, "b1")
    for task in (first, second, other):
        workers.submit(task, RuntimeError("closed"))
    assert first.started.wait(10) and other.started.wait(10)
    other.release.set()
    assert other.done.wait(10)
    assert not second.started.is_set(), "a second task of a busy lane must wait for the first"
    first.release.set()
    second.release.set()
    assert second.done.wait(10)
    assert log.index("end a1") < log.index("start a2")


def test_threads_are_few_and_outlive_their_tasks() -> None:
    workers = Workers(3, name="few")
    tasks = [Blocking(None, [], str(i)) for i in range(30)]
    for task in tasks:
        task.release.set()
        workers.submit(task, RuntimeError("closed"))
    assert all(task.done.wait(10) for task in tasks)
    alive = [t for t in threading.enumerate() if t.name.startswith("few-")]
    assert len(alive) == workers.threads == 3, "a fixed set of threads, alive between tasks"
    assert workers.close(RuntimeError("closed"), 10)
    assert not [t for t in threading.enumerate() if t.name.startswith("few-")]


def test_a_task_that_raises_does_not_kill_its_worker() -> None:
    workers = Workers(1)
    broken, after = Raising(None, [], "broken"), Blocking(None, [], "after")
    after.release.set()
    workers.submit(broken, RuntimeError("closed"))
    workers.submit(after, RuntimeError("closed"))
    assert after.done.wait(10) and after.error is None
    assert workers.close(RuntimeError("closed"), 10)


def test_close_fails_what_is_queued_and_joins_what_runs() -> None:
    workers = Workers(1)
    running, queued = Blocking("a", [], "running"), Blocking("a", [], "queued")
    workers.submit(running, RuntimeError("closed"))
    workers.submit(queued, RuntimeError("closed"))
    assert running.started.wait(10)
    closer = threading.Thread(target=lambda: workers.close(ServerShuttingDown("stop"), 30))
    closer.start()
    assert queued.done.wait(10) and isinstance(queued.error, ServerShuttingDown)
    assert closer.is_alive(), "close waits for the running task"
    running.release.set()
    closer.join(10)
    assert not closer.is_alive() and running.done.is_set()
    late = Blocking(None, [], "late")
    workers.submit(late, ServerShuttingDown("stop"))
    assert isinstance(late.error, ServerShuttingDown) and not late.started.is_set()


def test_a_discarded_task_never_runs(workers: Workers) -> None:
    blocker, dropped = Blocking("a", [], "blocker"), Blocking("a", [], "dropped")
    workers.submit(blocker, RuntimeError("closed"))
    workers.submit(dropped, RuntimeError("closed"))
    assert workers.discard(dropped) and not workers.discard(dropped)
    blocker.release.set()
    assert blocker.done.wait(10)
    assert not dropped.started.is_set()


def test_a_call_job_cancelled_while_queued_is_skipped() -> None:
    calls: list[int] = []
    job = CallJob(None, lambda: calls.append(1))
    job.cancel()
    job.run()
    assert calls == [] and job.future.cancelled()


# -- generation jobs on the demo model


@pytest.fixture(scope="module")
def long_model(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_context_copy(demo_kit.model, tmp_path_factory.mktemp("long") / "model")


def make_job(pool: ModelPool, model: Path, request: GenerationRequest) -> GenerationJob:
    loop = asyncio.get_running_loop()
    return GenerationJob(str(model), lambda: pool.acquire(str(model)), request, loop=loop)


def test_a_job_cancelled_while_queued_loads_nothing(demo_kit: DemoKit) -> None:
    with ModelPool(1 << 30) as pool:

        async def main() -> tuple[list[Event], list[Event]]:
            plain = make_job(pool, demo_kit.model, GenerationRequest(prompt="red", max_tokens=4))
            plain.cancel()
            stopping = make_job(pool, demo_kit.model, GenerationRequest(prompt="red", max_tokens=4))
            stopping.cancel(shutting_down())
            for job in (plain, stopping):
                job.run()
            return [await anext(plain.events())], [await anext(stopping.events())]

        (plain,), (stopping,) = asyncio.run(main())
        assert isinstance(plain, Finished) and plain.finish_reason == "cancelled"
        assert isinstance(stopping, Failed) and isinstance(stopping.error, ServerShuttingDown)
        assert pool.status().entries == []


def test_a_prompt_over_the_context_fails_before_any_model_work(demo_kit: DemoKit) -> None:
    with ModelPool(1 << 30, context_tokens=256) as pool:
        request = GenerationRequest(prompt=long_prompt(100), max_tokens=16)

        async def run() -> list[Event]:
            job = make_job(pool, demo_kit.model, request)
            threading.Thread(target=job.run).start()  # a plain thread is enough here
            return [e async for e in job.events()]

        (event,) = asyncio.run(run())
        assert isinstance(event, Failed) and isinstance(event.error, ContextError)
        message = str(event.error)
        assert "max_tokens is 16" in message and "context of 256 tokens" in message
        assert "truncate_prompt_tokens" in message
        assert all(e.in_use == 0 for e in pool.status().entries)


def test_truncation_keeps_the_end_of_the_prompt() -> None:
    tokens = list(range(100))
    assert (
        fit_context(tokens, GenerationRequest(prompt="x", max_tokens=8, truncate_prompt_tokens=10), 64, "")
        == tokens[-10:]
    )
    fitted = fit_context(
        tokens, GenerationRequest(prompt="x", max_tokens=24, truncate_prompt_tokens=-1), 64, ""
    )
    assert fitted == tokens[-40:]
    with pytest.raises(ContextError, match="The prompt has 60 tokens and max_tokens is 24: 84 tokens"):
        fit_context(tokens, GenerationRequest(prompt="x", max_tokens=24, truncate_prompt_tokens=60), 64, "")
    with pytest.raises(ContextError, match="over the context of 64 tokens"):
        fit_context(tokens, GenerationRequest(prompt="x", max_tokens=64, truncate_prompt_tokens=-1), 64, "")


def test_a_stop_request_ends_the_prefill_between_chunks(long_model: Path) -> None:
    """mlx-lm reads the prompt in chunks; asked to stop, the generation ends before the next one."""
    with ModelPool(1 << 30, context_tokens=LONG_CONTEXT) as pool, pool.acquire(str(long_model)) as lease:
        request = GenerationRequest(prompt=long_prompt(1000), raw=True, max_tokens=8)
        tokens = prompt_tokens(lease.tokenizer, request)
        chunks: list[int] = []
        generation = TextGeneration(
            lease.model, lease.tokenizer, tokens, request, should_stop=lambda: len(chunks) >= 2
        )
        original = generation._prefill_progress

        def progress(done: int, total: int) -> None:
            chunks.append(done)
            original(done, total)

        generation._prefill_progress = progress  # type: ignore[method-assign]
        assert list(generation) == []
        assert generation.stats.finish_reason == "cancelled"
        assert len(tokens) > 4 * 512 and chunks[-1] < len(tokens) // 2


def test_cancel_during_prefill_frees_the_base_for_the_next_job(long_model: Path) -> None:
    with ModelPool(1 << 30, context_tokens=LONG_CONTEXT) as pool:
        result: dict[str, list[Event]] = {}

        async def main() -> None:
            workers = Workers(1)
            long = make_job(pool, long_model, GenerationRequest(prompt=long_prompt(), raw=True, max_tokens=8))
            short = make_job(pool, long_model, GenerationRequest(prompt="red", raw=True, max_tokens=4))
            workers.submit(long, shutting_down())
            workers.submit(short, shutting_down())
            events = []
            async for event in long.events():
                events.append(event)
                if isinstance(event, Started):
                    long.cancel()  # as a client that leaves while its prompt is read
            result["long"] = events
            result["short"] = [e async for e in short.events()]
            assert workers.close(shutting_down(), 60)

        asyncio.run(main())
        long_events, short_events = result["long"], result["short"]
        assert isinstance(long_events[0], Started) and not any(isinstance(e, Piece) for e in long_events)
        assert isinstance(long_events[-1], Finished) and long_events[-1].finish_reason == "cancelled"
        stats = long_events[-1].stats
        assert stats.generation_tokens == 0 and stats.prefilled_tokens < stats.prompt_tokens
        assert isinstance(short_events[-1], Finished) and short_events[-1].finish_reason in ("stop", "length")
        assert all(e.in_use == 0 for e in pool.status().entries)


def test_shutdown_during_prefill_ends_the_job_with_the_shutdown_error(long_model: Path) -> None:
    with ModelPool(1 << 30, context_tokens=LONG_CONTEXT) as pool:

        async def main() -> list[Event]:
            workers = Workers(1)
            job = make_job(pool, long_model, GenerationRequest(prompt=long_prompt(), raw=True, max_tokens=8))
            workers.submit(job, shutting_down())
            events = []
            async for event in job.events():
                events.append(event)
                if isinstance(event, Started):
                    job.cancel(shutting_down())
            assert workers.close(shutting_down(), 60)
            return events

        events = asyncio.run(main())
        assert isinstance(events[-1], Failed) and isinstance(events[-1].error, ServerShuttingDown)


def test_a_request_that_leaves_while_queued_ends_at_once(demo_kit: DemoKit) -> None:
    """Its job leaves the queue and ends, without waiting for the busy base's turn."""
    with ModelPool(1 << 30) as pool:
        state = ServerState(pool, ServerConfig(workers=1))
        blocker = Blocking(str(demo_kit.model), [], "blocker")

        async def main() -> Event:
            state.workers.submit(blocker, shutting_down())
            job = make_job(pool, demo_kit.model, GenerationRequest(prompt="red", max_tokens=4))
            state.submit(job)
            assert blocker.started.wait(10) and state.workers.queued == 1
            state.release(job)
            return await anext(job.events())

        try:
            event = asyncio.run(main())
            assert isinstance(event, Finished) and event.finish_reason == "cancelled"
            assert state.workers.queued == 0 and not state.jobs and not blocker.done.is_set()
        finally:
            blocker.release.set()
            assert state.close(30)
        assert pool.status().entries == []
