"""Generation in a worker thread, streamed back to the event loop, stoppable from either side."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import cast

from mlxman.errors import UsageError
from mlxman.generate import GenerationRequest, GenerationStats, TextGeneration, prompt_tokens
from mlxman.pool import Lease

# What the pool's ``acquire`` gives for one request, bound to its model and adapter.
Acquire = Callable[[], AbstractContextManager[Lease, bool | None]]


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats
    finish_reason: str


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Piece | Finished | Failed


class StopMatcher:
    """Cut the text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop sequence was hit."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            ready, self.pending = self.pending[: min(hits)], ""
            return ready, True
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return ready, False

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return ready


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that begins ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


class GenerationJob:
    """One request's generation: the thread holds the pool lease (the base's lock) for as long as it runs."""

    def __init__(self, acquire: Acquire, request: GenerationRequest, stops: Sequence[str] = ()) -> None:
        self._acquire = acquire
        self.request = request
        self._stops = stops
        self._cancelled = threading.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="mlxman-generate", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        """Stop at the next token (or before starting); the thread then releases its lease."""
        self._cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    async def events(self) -> AsyncGenerator[Event, None]:
        """Pieces of text, then one Finished or Failed; leaving early cancels the generation."""
        if self._thread is None:
            self.start()
        try:
            while True:
                event = await self._queue.get()
                yield event
                if not isinstance(event, Piece):
                    return
        finally:
            self.cancel()

    def _emit(self, event: Event) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self.cancel()
            return
        try:
            loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop closed meanwhile (server shutting down)
            self.cancel()

    def _run(self) -> None:
        try:
            self._emit(self._generate())
        except BaseException as exc:  # every failure must reach the waiting request
            self._emit(Failed(exc))

    def _generate(self) -> Finished:
        matcher = StopMatcher(self._stops)
        stopped = False
        with self._acquire() as lease:
            if lease.kind != "text":
                raise UsageError(
                    f"This model is a {lease.kind} model; it cannot generate text here",
                    "use /v1/embeddings for embeddings models" if lease.kind == "embeddings" else None,
                )
            tokens = prompt_tokens(lease.tokenizer, self.request)
            generation = TextGeneration(lease.model, lease.tokenizer, tokens, self.request)
            if self._cancelled.is_set():
                return Finished(generation.stats, "cancelled")
            pieces = cast(Generator[str, None, None], iter(generation))
            try:
                for piece in pieces:
                    if self._cancelled.is_set():
                        break
                    ready, stopped = matcher.feed(piece)
                    if ready:
                        self._emit(Piece(ready))
                    if stopped:
                        break
            finally:
                # Closing the generator ends mlx-lm's loop now, before the lease (and the base) is released.
                pieces.close()
        if not stopped:
            rest = matcher.flush()
            if rest:
                self._emit(Piece(rest))
        stats = generation.stats
        if self._cancelled.is_set():
            return Finished(stats, "cancelled")
        return Finished(stats, "stop" if stopped else stats.finish_reason or "stop")
