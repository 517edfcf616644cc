"""The per-base scheduler: one long-lived thread runs continuous batching for the requests on one base.

Requests join at the next step and leave at the next step when they finish, stop or are cancelled. Rows on
different LoRA adapters share each forward through the base's slots. An adapter that cannot use a slot (DoRA,
a rank above the slot maximum, embedding or other module types) runs on the swap path: the batch drains, the
adapter is swapped in with mlx-lm's own wrappers, its queued requests run together, then slots come back.
Admission is first-in first-out: a request that cannot join yet (no free slot, no memory, a drain) holds
back those behind it, so none starves. Rows that end leave their KV in the prefix cache, keyed by adapter and
tokens; a later row on the same adapter that shares a prefix joins with a copy of it and prefills only the
rest. That cache counts in the grant and is emptied, oldest first, before any row is kept waiting for memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mlxman.engine.batching import Batch, cannot_batch
from mlxman.engine.prefix import DEFAULT_PREFIX_CACHE_BYTES, PREFIX_CACHE_SHARE, PrefixCache
from mlxman.engine.rows import OnEvent, Row, Submission, Ticket
from mlxman.engine.slots import NO_ADAPTER, SlotBank
from mlxman.errors import MemoryBudgetError, MlxmanError, UsageError
from mlxman.memory import format_bytes
from mlxman.pool.layout import column_major_linears
from mlxman.pool.swap import AdapterWeights, Applied, apply_adapter, strip_adapter

# mlx-lm's server decodes up to 32 requests at once (--decode-concurrency); the same default here.
DEFAULT_MAX_ROWS = 32
DEFAULT_MAX_QUEUE = 256
# Prompt tokens per prefill chunk: rows already decoding advance between chunks, and a cancel is seen there.
DEFAULT_PREFILL_STEP = 512
# How long a scheduler with waiting rows but no room sleeps before trying again (memory may have freed).
RETRY_SECONDS = 0.05
# What a client is told to wait before retrying when the queue is full.
RETRY_AFTER_SECONDS = 1


class EngineBusy(MlxmanError):
    """The engine's queue is full; the request may be retried (HTTP 429 with Retry-After)."""

    retry_after = RETRY_AFTER_SECONDS


class EngineClosed(MlxmanError):
    """The engine was closed (its base unloaded or the server stopping)."""


class MemoryGrant(Protocol):
    """The pool's side of the engine's working memory (slot stacks plus the batch's KV cache)."""

    def resize(self, nbytes: int) -> bool:
        """Hold ``nbytes`` in total for this engine from now on; False when that does not fit now."""
        ...

    @property
    def ceiling(self) -> int:
        """The most this engine could ever hold; a request needing more is refused at once."""
        ...


class Unlimited:
    """No budget: every resize fits (tests, the CLI)."""

    ceiling = 1 << 62

    def resize(self, nbytes: int) -> bool:
        return True


class SwapPath(Protocol):
    """Wear one adapter on the plain base (the slots' wrappers are off meanwhile), then take it off."""

    def wear(self, adapter: AdapterWeights) -> None: ...

    def strip(self) -> None: ...


class AdapterSwap:
    """The swap path through mlxman's hot-swap: mlx-lm's LoRA/DoRA wrappers, exactly as ``mlx_lm.load``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._applied: Applied | None = None

    def wear(self, adapter: AdapterWeights) -> None:
        self.strip()
        self._applied = apply_adapter(self.model, adapter)

    def strip(self) -> None:
        if self._applied is not None:
            strip_adapter(self.model, self._applied)
            self._applied = None


class Runner(Protocol):
    """Long-lived threads to run engine loops on, reused from one engine to the next.

    MLX keeps OS threads per thread that ran on a stream, even after ``mx.clear_streams()``: a thread per
    engine would leak them each time a base is unloaded and loaded again. A runner's thread enters
    mlx-lm's generation stream once and clears its streams only when it ends."""

    def run(self, loop: Callable[[], None]) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    max_rows: int = DEFAULT_MAX_ROWS
    max_queue: int = DEFAULT_MAX_QUEUE
    prefill_step_size: int = DEFAULT_PREFILL_STEP
    # 2 * layers * kv_heads * head_dim * dtype bytes (the pool's estimate); 0 leaves KV unaccounted.
    kv_bytes_per_token: int = 0
    # Seconds a request may wait for memory held by running rows (the pool's admission timeout); None: no end.
    admission_timeout: float | None = None
    # The prefix cache's cap (and never over PREFIX_CACHE_SHARE of the grant's ceiling); 0 turns it off.
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES


@dataclass(frozen=True)
class EngineStatus:
    rows: int
    waiting: int
    slot_bytes: int
    kv_bytes: int
    slot_adapters: tuple[str, ...]
    swapped_adapter: str | None
    # Forward passes that generated tokens, and the tokens they generated: more tokens than steps is batching.
    decode_steps: int = 0
    tokens: int = 0
    # The prefix cache: its entries and bytes, and the prompt tokens it saved from prefill so far.
    prefix_entries: int = 0
    prefix_bytes: int = 0
    prefix_reused_tokens: int = 0


class Engine:
    """Continuous batching on one resident base. ``submit`` from any thread; events come on the engine's."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        bank: SlotBank | None = None,
        config: EngineConfig | None = None,
        grant: MemoryGrant | None = None,
        swap: SwapPath | None = None,
        name: str = "base",
        runner: Runner | None = None,
    ) -> None:
        why = cannot_batch(model)
        if why is not None:
            raise UsageError(f"This model cannot run batched: {why}", "serve it on the one-request path")
        self.model, self.tokenizer, self.bank, self.name = model, tokenizer, bank, name
        self.config = config or EngineConfig()
        self._grant = grant or Unlimited()
        self._swap = swap or AdapterSwap(model)
        cap = self.config.prefix_cache_bytes
        self._prefix = PrefixCache(min(cap, int(self._grant.ceiling * PREFIX_CACHE_SHARE)) if cap > 0 else 0)
        self._cond = threading.Condition()
        self._inbox: list[Row] = []
        self._drops: list[AdapterWeights] = []
        self._closing = False
        self._close_reason: BaseException | None = None
        # Engine thread only from here on.
        self._waiting: deque[Row] = deque()
        self._active: dict[int, Row] = {}
        self._wearing: AdapterWeights | None = None
        self._kv_bytes = 0
        self._slot_bytes = bank.nbytes if bank is not None else 0
        self._slot_adapters: tuple[str, ...] = ()
        self._batch: Batch | None = None
        self._decode_steps = 0
        self._tokens = 0
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._ended = threading.Event()
        self._ident: int | None = None
        if runner is None:
            threading.Thread(target=self._run, name=f"mlxman-engine-{name}", daemon=True).start()
        else:
            runner.run(self._run_on_runner)
        self._started.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # -- any thread

    def submit(self, submission: Submission, on_event: OnEvent | None = None) -> Ticket:
        """Queue a request. ``on_event`` runs on the engine thread and must not block (hand the event over);
        without it, iterate ``ticket.events()``. Raises EngineBusy when the queue is full."""
        tokens, max_tokens = submission.tokens, submission.request.max_tokens
        if not tokens:
            raise UsageError("The prompt has no tokens", "send a non-empty prompt")
        if max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {max_tokens}", "send max_tokens >= 1")
        kv = submission.kv_tokens * self.config.kv_bytes_per_token
        if kv > self._grant.ceiling:
            raise MemoryBudgetError(
                f"The prompt ({len(tokens)} tokens) plus max_tokens ({max_tokens}) needs "
                f"{format_bytes(kv)} of KV cache, more than the {format_bytes(self._grant.ceiling)} "
                "this model can ever get",
                "shorten the prompt or lower max_tokens, or raise the memory limit",
            )
        adapter = submission.adapter
        needs_swap = adapter is not None and (self.bank is None or self.bank.problem(adapter) is not None)
        ticket = Ticket(on_event, self._wake)
        row = Row(submission, ticket, self.tokenizer, needs_swap)
        with self._cond:
            if self._closing:
                raise EngineClosed("The model is being unloaded", "retry the request")
            if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
                raise EngineBusy(
                    f"{self.config.max_queue} requests are already waiting for this model",
                    f"retry in {RETRY_AFTER_SECONDS} s, or raise the queue limit",
                )
            self._inbox.append(row)
            self._cond.notify()
        return ticket

    def status(self) -> EngineStatus:
        wearing = self._wearing
        return EngineStatus(
            rows=len(self._active),
            waiting=len(self._waiting) + len(self._inbox),
            slot_bytes=self._slot_bytes,
            kv_bytes=self._kv_bytes,
            slot_adapters=self._slot_adapters,
            swapped_adapter=str(wearing.path) if wearing is not None else None,
            decode_steps=self._decode_steps,
            tokens=self._tokens,
            prefix_entries=len(self._prefix),
            prefix_bytes=self._prefix.nbytes,
            prefix_reused_tokens=self._prefix.reused_tokens,
        )

    @property
    def alive(self) -> bool:
        """Whether the engine's thread still runs (it ends once closed and its rows have ended)."""
        return not self._ended.is_set()

    def forget(self, adapter: AdapterWeights) -> None:
        """Clear ``adapter``'s slot once no row uses it (the pool evicted it); its memory leaves the grant."""
        with self._cond:
            self._drops.append(adapter)
            self._cond.notify()

    def close(self, reason: BaseException | None = None, timeout: float | None = None) -> None:
        """Stop: every waiting and running request ends (Failed(reason), or Finished("cancelled"))."""
        with self._cond:
            self._closing = True
            self._close_reason = reason
            self._cond.notify()
        if threading.get_ident() != self._ident:  # a callback may close its own engine
            self._ended.wait(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread

    def _run(self) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        # MLX streams belong to threads: everything this thread runs goes on its own generation stream.
        try:
            with mx.stream(generation_stream):
                self._run_on_runner()
        finally:
            # Without this, a thread's streams outlive it, and compiled functions run on them make the
            # process abort at exit ("terminate called without an active exception").
            mx.clear_streams()

    def _run_on_runner(self) -> None:
        """The engine's loop, on a thread already on mlx-lm's generation stream."""
        self._ident = threading.get_ident()
        try:
            self._loop()
        finally:
            self._ended.set()

    def _loop(self) -> None:
        try:
            # On the CPU the matmuls run 2x faster with the weights laid out column-major (pool/layout.py);
            # a model the pool loaded is laid out already, and doing it again changes nothing.
            column_major_linears(self.model)
            self._batch = self._new_batch()
        except BaseException as exc:
            self._startup_error = exc
            self._started.set()
            return
        self._grant.resize(self._slot_bytes)
        self._started.set()
        while True:
            with self._cond:
                if not (self._inbox or self._closing or self._active):
                    self._cond.wait(RETRY_SECONDS if self._waiting or self._drops else None)
                incoming, self._inbox = self._inbox, []
                drops, self._drops = self._drops, []
                closing = self._closing
            self._waiting.extend(incoming)
            if drops:
                self._forget(drops)
            if closing:
                self._shutdown()
                return
            self._drop_cancelled()
            self._admit()
            if self._active:
                self._step()
            elif not self._waiting and self._wearing is not None:
                self._leave_swap()

    def _forget(self, adapters: list[AdapterWeights]) -> None:
        bank = self.bank
        if bank is None:
            return
        for adapter in adapters:
            slot = bank.slot_of(adapter)
            if any(r.adapter is adapter for r in self._waiting) or (slot and bank.active_rows(slot)):
                with self._cond:
                    self._drops.append(adapter)  # again once its rows have left
            elif slot:
                bank.clear_slot(slot)
        self._slot_bytes = bank.nbytes
        self._slot_adapters = tuple(str(a.path) for a in bank.resident())
        self._hold(self._kv_bytes)

    def _drop_cancelled(self) -> None:
        assert self._batch is not None
        for uid, row in list(self._active.items()):
            if row.ticket.cancelled:
                self._batch.remove(uid, keep_kv=True)
                self._end(row, "cancelled")
        if any(row.ticket.cancelled for row in self._waiting):
            for row in [r for r in self._waiting if r.ticket.cancelled]:
                row.finish("cancelled", 0)
            self._waiting = deque(r for r in self._waiting if not r.ticket.cancelled)

    def _admit(self) -> None:
        """Move waiting rows into the batch, first come first served, while they fit."""
        assert self._batch is not None
        while self._waiting and len(self._active) < self.config.max_rows:
            row = self._waiting[0]
            if row.needs_swap and self._wearing is not row.adapter:
                if self._active:
                    return  # drain the batch, then swap
                if not self._enter_swap(row):
                    continue
            elif not row.needs_swap and self._wearing is not None:
                if self._active:
                    return
                self._leave_swap()
            try:
                slot = self._slot_for(row)
            except Exception as exc:  # an adapter that fails to load into a slot fails its request only
                self._waiting.popleft()
                row.fail(exc)
                continue
            if slot is None:
                timeout = self.config.admission_timeout
                if timeout is not None and row.waited > timeout:
                    self._waiting.popleft()
                    row.fail(
                        MemoryBudgetError(
                            f"The request waited {row.waited:.0f} s for memory or an adapter slot held by "
                            f"{len(self._active)} running request(s) on {self.name}",
                            "retry later, raise --memory-limit, or lower max_tokens",
                        )
                    )
                    continue
                return  # no slot or no memory yet: wait for rows to leave
            self._waiting.popleft()
            tokens = list(row.submission.tokens)
            cache, cached = self._prefix.fetch(self._kv_adapter(row), tokens)
            uid = self._batch.add(
                tokens,
                slot=slot,
                max_tokens=row.submission.request.max_tokens,
                sampler=row.make_sampler(),
                cache=cache,
                cached=cached,
            )
            self._active[uid] = row
            row.join(uid, slot)

    def _slot_for(self, row: Row) -> int | None:
        """The row's slot (writing its adapter if needed) once its KV and slot memory fit; None to wait."""
        kv = self._kv_for([*self._active.values(), row])
        # A swapped-in adapter is worn by the whole model: its rows take slot 0, the plain base's.
        adapter, bank = (None, None) if row.needs_swap else (row.adapter, self.bank)
        growth = 0
        if adapter is not None and bank is not None and bank.slot_of(adapter) is None:
            growth = bank.growth_bytes(adapter)
        if not self._hold(kv, growth):
            self._hold(self._kv_bytes)
            return None
        slot = NO_ADAPTER if adapter is None or bank is None else bank.acquire(adapter)
        if bank is not None:
            self._slot_bytes = bank.nbytes
            self._slot_adapters = tuple(str(a.path) for a in bank.resident())
        if slot is None:
            self._hold(self._kv_bytes)
            return None
        self._kv_bytes = kv
        self._hold(kv)
        return slot

    def _hold(self, kv: int, growth: int = 0) -> bool:
        """Ask the grant for slots, ``growth``, ``kv`` and the prefix cache; prefix entries go, oldest
        first, until it fits. False when it does not fit even with the prefix cache empty."""
        while not self._grant.resize(self._slot_bytes + growth + kv + self._prefix.nbytes):
            if not self._prefix.evict_one():
                return False
        return True

    def _kv_adapter(self, row: Row) -> AdapterWeights | None:
        """The adapter the row's KV is computed with (the prefix cache's key beside the tokens)."""
        return row.adapter

    def _kv_for(self, rows: Sequence[Row]) -> int:
        """The batch's KV at its largest: every row is padded to the longest one (mlx-lm's BatchKVCache)."""
        if not rows:
            return 0
        return len(rows) * max(r.submission.kv_tokens for r in rows) * self.config.kv_bytes_per_token

    def _enter_swap(self, row: Row) -> bool:
        assert row.adapter is not None
        if self.bank is not None:
            self.bank.detach()
        try:
            self._swap.wear(row.adapter)
        except Exception as exc:
            self._swap.strip()
            if self.bank is not None:
                self.bank.attach()
            self._waiting.popleft()
            row.fail(exc)
            return False
        self._wearing = row.adapter
        return True

    def _leave_swap(self) -> None:
        self._swap.strip()
        self._wearing = None
        if self.bank is not None:
            self.bank.attach()

    def _step(self) -> None:
        assert self._batch is not None
        try:
            tokens = self._batch.step()
        except Exception as exc:  # a failed forward fails the rows in it, not the engine
            self._fail_batch(exc)
            return
        if tokens:
            self._decode_steps += 1
            self._tokens += len(tokens)
        for t in tokens:
            row = self._active.get(t.uid)
            if row is None:
                continue
            reason = row.token(t.token, t.finish_reason)
            if reason is not None:
                if t.finish_reason is None:  # stopped by a text stop sequence: the generator still has it
                    self._batch.remove(t.uid, keep_kv=True)
                self._end(row, reason)

    def _end(self, row: Row, reason: str) -> None:
        import mlx.core as mx

        self._leave_batch(row)
        assert self._batch is not None and row.uid is not None
        kept = self._batch.take_kv(row.uid)
        if kept is not None:
            self._prefix.store(self._kv_adapter(row), *kept)
            self._hold(self._kv_bytes)
        if not row.stats.generation_tokens:  # ended while reading its prompt: say how far it got
            row.stats.prefilled_tokens = self._batch.prefilled(row.uid)
        row.finish(reason, int(mx.get_peak_memory()))

    def _leave_batch(self, row: Row) -> None:
        """Give back the row's slot and KV; the generator has already dropped it."""
        assert row.uid is not None
        del self._active[row.uid]
        if row.slot and self.bank is not None and not row.needs_swap:
            self.bank.release(row.slot)
        self._kv_bytes = self._kv_for(list(self._active.values()))
        self._hold(self._kv_bytes)

    def _fail_batch(self, error: BaseException) -> None:
        assert self._batch is not None
        for row in list(self._active.values()):
            self._leave_batch(row)
            row.fail(error)
        try:
            self._batch.close()
        finally:
            self._batch = self._new_batch()

    def _new_batch(self) -> Batch:
        return Batch(
            self.model,
            self.bank,
            eos_token_ids=sorted(getattr(self.tokenizer, "eos_token_ids", None) or ()),
            max_rows=self.config.max_rows,
            prefill_step_size=self.config.prefill_step_size,
        )

    def _shutdown(self) -> None:
        assert self._batch is not None
        reason = self._close_reason
        for row in [*self._active.values(), *self._waiting, *self._take_inbox()]:
            if reason is not None:
                row.ticket.cancel(reason)
            if row.uid is not None and row.uid in self._active:
                self._batch.remove(row.uid)
                self._end(row, "cancelled")
            else:
                row.finish("cancelled", 0)
        self._waiting.clear()
        if self._wearing is not None:
            self._leave_swap()
        self._batch.close()
        self._batch = None
        if self.bank is not None:
            self.bank.select([])

    def _take_inbox(self) -> list[Row]:
        with self._cond:
            rows, self._inbox = self._inbox, []
        return rows
