"""Model work as tasks for the worker threads: generations streamed to the event loop, and plain calls."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import AbstractContextManager
from typing import Generic, Protocol, TypeVar, cast

from mlxman.engine.events import Event, Failed, Finished, Piece, Started, StopMatcher
from mlxman.engine.hosting import Engines
from mlxman.engine.rows import Submission, Ticket
from mlxman.errors import ContextError, MemoryBudgetError, UsageError
from mlxman.generate import (
    GenerationRequest,
    GenerationStats,
    TextGeneration,
    fit_context,
    prompt_tokens,
)
from mlxman.pool import Hold, Lease

# What the pool's ``acquire`` gives for one request, bound to its model and adapter.
Acquire = Callable[[], AbstractContextManager[Lease, bool | None]]
# What the pool's ``hold`` gives for one engine request: the model held in use, no lock, no swap.
HoldModel = Callable[[], Hold]
T = TypeVar("T")
log = logging.getLogger("mlxman.server")

CONTEXT_HINT = (
    "shorten the prompt or lower max_tokens, or send truncate_prompt_tokens "
    "(-1 keeps the end of the prompt that fits)"
)


class Job(Protocol):
    """What the server tracks for each model-bound request: a worker task that can be cancelled."""

    @property
    def lane(self) -> str | None: ...

    def run(self) -> None: ...

    def fail(self, error: BaseException) -> None: ...

    def cancel(self, reason: BaseException | None = None) -> None: ...


class GenerationJob:
    """One request's generation. The worker running it holds the pool lease (the base's lock) throughout.

    Events reach the event loop in order: Started (model held, prompt fits), Pieces, then Finished or Failed.
    ``cancel`` is seen before the model is acquired, between prefill chunks and after every token; with a
    ``reason`` (the server stopping) the job ends as Failed(reason) instead of Finished("cancelled").
    """

    def __init__(
        self,
        lane: str | None,
        acquire: Acquire,
        request: GenerationRequest,
        stops: Sequence[str] = (),
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.lane = lane
        self.request = request
        self._acquire = acquire
        self._stops = stops
        self._cancelled = threading.Event()
        self._reason: BaseException | None = None
        self._loop = loop or asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()

    def cancel(self, reason: BaseException | None = None) -> None:
        if reason is not None and self._reason is None:
            self._reason = reason
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def fail(self, error: BaseException) -> None:
        self._emit(Failed(error))

    def run(self) -> None:
        try:
            outcome = self._generate()
        except BaseException as exc:  # every failure must reach the waiting request
            outcome = Failed(exc)
        if outcome is not None:
            self._emit(outcome)

    async def events(self) -> AsyncGenerator[Event, None]:
        """Started, pieces of text, then one Finished or Failed; leaving early cancels the generation."""
        try:
            while True:
                event = await self._queue.get()
                yield event
                if isinstance(event, Finished | Failed):
                    return
        finally:
            self.cancel()

    def _emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancel()

    def _stopped(self, stats: GenerationStats) -> Finished | Failed:
        if stats.prefilled_tokens < stats.prompt_tokens:
            log.info(
                "stopped %s while reading its prompt (%d of %d tokens)",
                self.lane,
                stats.prefilled_tokens,
                stats.prompt_tokens,
            )
        return Failed(self._reason) if self._reason is not None else Finished(stats, "cancelled")

    def _generate(self) -> Finished | Failed | None:
        if self.cancelled:  # left (or the server stopped) while queued: load nothing
            return self._stopped(GenerationStats())
        matcher = StopMatcher(self._stops)
        stopped = False
        with self._acquire() as lease:
            if lease.kind != "text":
                raise UsageError(
                    f"This model is a {lease.kind} model; it cannot generate text here",
                    "use /v1/embeddings for embeddings models" if lease.kind == "embeddings" else None,
                )
            prompt = prompt_tokens(lease.tokenizer, self.request)
            tokens = fit_context(prompt, self.request, lease.context_tokens, CONTEXT_HINT)
            generation = TextGeneration(
                lease.model, lease.tokenizer, tokens, self.request, should_stop=self._cancelled.is_set
            )
            if self.cancelled:
                return self._stopped(generation.stats)
            self._emit(Started(len(tokens)))
            pieces = cast(Generator[str, None, None], iter(generation))
            try:
                for piece in pieces:
                    ready, stopped = matcher.feed(piece)
                    if ready:
                        self._emit(Piece(ready))
                    if stopped:
                        break
            finally:
                # Closing the generator ends mlx-lm's loop now, before the lease (and the base) is released.
                pieces.close()
        stats = generation.stats
        if stats.finish_reason == "cancelled":
            return self._stopped(stats)
        if not stopped:
            rest = matcher.flush()
            if rest:
                self._emit(Piece(rest))
        return Finished(stats, "stop" if stopped else stats.finish_reason or "stop")


class EngineJob(GenerationJob):
    """A text generation run by its base's engine, in one batch with other requests (other adapters too).

    The worker only holds the model and hands the request to the engine; events then come from the engine's
    thread. A model that cannot batch (or is not a text model) takes the one-request path of GenerationJob.
    The base and adapter entries stay held in use from submission until the row's last event.
    """

    def __init__(
        self,
        lane: str | None,
        acquire: Acquire,
        hold: HoldModel,
        engines: Engines,
        request: GenerationRequest,
        stops: Sequence[str] = (),
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(lane, acquire, request, stops, loop=loop)
        self._hold = hold
        self._engines = engines
        self._ticket: Ticket | None = None

    def cancel(self, reason: BaseException | None = None) -> None:
        super().cancel(reason)
        ticket = self._ticket
        if ticket is not None:
            ticket.cancel(self._reason)

    def _generate(self) -> Finished | Failed | None:
        if self.cancelled:
            return self._stopped(GenerationStats())
        hold = self._hold()
        try:
            engine = self._engines.engine_for(hold)
            if engine is None:
                try:
                    return super()._generate()
                finally:
                    hold.release()
            prompt = prompt_tokens(hold.tokenizer, self.request)
            tokens = fit_context(prompt, self.request, hold.context_tokens, CONTEXT_HINT)
            submission = Submission(tokens, self.request, hold.adapter, self._stops)
            try:
                ticket = engine.submit(submission, lambda event: self._engine_event(hold, event))
            except MemoryBudgetError as exc:  # its KV can never fit: too large a request, not a busy server
                raise ContextError(exc.message, exc.hint) from None
        except BaseException:
            hold.release()
            raise
        self._ticket = ticket
        if self.cancelled:  # cancelled while being submitted
            ticket.cancel(self._reason)
        return None

    def _engine_event(self, hold: Hold, event: Event) -> None:
        """On the engine's thread: hand the event over, never block; the last event releases the model."""
        if isinstance(event, Finished | Failed):
            hold.release()
            if isinstance(event, Finished) and event.finish_reason == "cancelled":
                event = self._stopped(event.stats)
        self._emit(event)


class CallJob(Generic[T]):
    """A plain function run by a worker (embeddings, loads, unloads), awaited on the event loop."""

    def __init__(self, lane: str | None, fn: Callable[[], T]) -> None:
        self.lane = lane
        self._fn = fn
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            result = self._fn()
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    def fail(self, error: BaseException) -> None:
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(error)

    def cancel(self, reason: BaseException | None = None) -> None:
        """Skip the call if it has not started; a started call (one bounded piece of work) runs to its end."""
        self.future.cancel()

    async def result(self) -> T:
        return await asyncio.wrap_future(self.future)
