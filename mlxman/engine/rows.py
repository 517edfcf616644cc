"""One request in the engine: what was submitted, the caller's ticket, and the row's text, stops and stats."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mlxman.engine.events import Event, Failed, Finished, Piece, Started, StopMatcher
from mlxman.engine.sampling import Sampler, row_sampler
from mlxman.generate import GenerationRequest, GenerationStats
from mlxman.pool.swap import AdapterWeights

# KV caches grow in steps of this many tokens (mlx-lm's KVCache.step).
KV_STEP_TOKENS = 256

OnEvent = Callable[[Event], None]


@dataclass(frozen=True)
class Submission:
    """A request for the engine: prompt tokens (already templated and fit to the context) and its settings."""

    tokens: Sequence[int]
    request: GenerationRequest  # max_tokens, temperature, top_p and seed are used
    adapter: AdapterWeights | None = None
    stops: Sequence[str] = ()

    @property
    def kv_tokens(self) -> int:
        """The KV positions this row can reach: prompt plus max_tokens, in whole cache steps."""
        need = len(self.tokens) + self.request.max_tokens
        return -(-need // KV_STEP_TOKENS) * KV_STEP_TOKENS


class Ticket:
    """The caller's handle on a submitted request: cancel it, or (without a callback) iterate its events."""

    def __init__(self, on_event: OnEvent | None, wake: Callable[[], None]) -> None:
        self._on_event = on_event
        self._queue: queue.SimpleQueue[Event] | None = None if on_event else queue.SimpleQueue()
        self._wake = wake
        self._cancelled = threading.Event()
        self.reason: BaseException | None = None
        self.done = threading.Event()

    def cancel(self, reason: BaseException | None = None) -> None:
        """Stop the row at the next step (a prefill stops at its next chunk). With a ``reason`` (say, the
        server stopping) it ends as Failed(reason), else as Finished("cancelled")."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event: Event) -> None:
        """Runs on the engine thread; a callback that raises means its caller left: the row is cancelled."""
        if isinstance(event, Finished | Failed):
            self.done.set()
        try:
            if self._on_event is not None:
                self._on_event(event)
            else:
                assert self._queue is not None
                self._queue.put(event)
        except Exception:
            self._cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Started, Pieces, then one Finished or Failed (for a ticket submitted without a callback)."""
        if self._queue is None:
            raise RuntimeError("this ticket delivers its events to its callback")
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if isinstance(event, Finished | Failed):
                return

    def result(self, timeout: float | None = None) -> tuple[str, Finished]:
        """Wait for the whole answer: its text and the Finished event; a failure is raised."""
        text = []
        for event in self.events(timeout):
            if isinstance(event, Piece):
                text.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                return "".join(text), event
        raise AssertionError("unreachable")


class Row:
    """A request from submission to its last event; only the engine thread touches it after ``submit``."""

    def __init__(self, submission: Submission, ticket: Ticket, tokenizer: Any, needs_swap: bool) -> None:
        self.submission = submission
        self.ticket = ticket
        self.needs_swap = needs_swap  # its adapter cannot use a slot: it runs with the adapter swapped in
        self.sampler: Sampler | None = None
        self.slot: int | None = None
        self.uid: int | None = None
        self._tokenizer = tokenizer
        self._detokenizer: Any = None
        self._matcher = StopMatcher(submission.stops)
        self.stats = GenerationStats(prompt_tokens=len(submission.tokens))
        self._submitted = time.perf_counter()
        self._joined = 0.0
        self._first = 0.0

    @property
    def adapter(self) -> AdapterWeights | None:
        return self.submission.adapter

    @property
    def waited(self) -> float:
        """Seconds since the request was submitted."""
        return time.perf_counter() - self._submitted

    def join(self, uid: int, slot: int) -> None:
        self.uid, self.slot = uid, slot
        self._joined = time.perf_counter()
        self._detokenizer = self._tokenizer.detokenizer
        self.ticket.emit(Started(len(self.submission.tokens)))

    def make_sampler(self) -> Sampler | None:
        request = self.submission.request
        self.sampler = row_sampler(request.temperature, request.top_p, request.seed)
        return self.sampler

    def token(self, token: int, finish_reason: str | None) -> str | None:
        """Take one generated token; returns the finish reason when the row is done (text stops included)."""
        now = time.perf_counter()
        stats = self.stats
        if not stats.generation_tokens:
            self._first = now
            stats.time_to_first_token = now - self._submitted
            stats.prefilled_tokens = stats.prompt_tokens
            stats.prompt_tps = stats.prompt_tokens / max(now - self._joined, 1e-9)
        stats.generation_tokens += 1
        if stats.generation_tokens > 1:
            stats.generation_tps = (stats.generation_tokens - 1) / max(now - self._first, 1e-9)
        detokenizer = self._detokenizer
        if finish_reason != "stop":  # an end-of-sequence token is not part of the text (as in mlx-lm)
            detokenizer.add_token(token)
        if finish_reason is not None:
            detokenizer.finalize()
        ready, hit = self._matcher.feed(detokenizer.last_segment)
        if hit:
            finish_reason = "stop"
        elif finish_reason is not None:
            ready += self._matcher.flush()
        if ready:
            self.ticket.emit(Piece(ready))
        return finish_reason

    def finish(self, reason: str, peak_memory: int) -> None:
        stats = self.stats
        stats.seconds = time.perf_counter() - self._submitted
        stats.peak_memory_bytes = peak_memory
        if reason == "cancelled" and self.ticket.reason is not None:
            stats.finish_reason = "cancelled"
            self.ticket.emit(Failed(self.ticket.reason))
            return
        stats.finish_reason = reason
        self.ticket.emit(Finished(stats, reason))

    def fail(self, error: BaseException) -> None:
        self.stats.seconds = time.perf_counter() - self._submitted
        self.ticket.emit(Failed(error))
