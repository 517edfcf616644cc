"""The pool's resident bases hosted by engines: one Engine per base that can batch, created on first use.

The pool owns residency and memory; this module is the only glue. An engine's memory (its adapter slots
and its batch's KV) is granted by the pool against the budget; an entry the pool frees first closes its
base's engine, or clears its adapter's slot. Once a base has an engine, only the engine runs that model:
requests hold the base (and adapter entry) in use with ``ModelPool.hold`` and never swap adapters on it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlxman.engine.scheduler import DEFAULT_PREFILL_STEP, Engine, EngineClosed, EngineConfig
from mlxman.engine.slots import SlotBank
from mlxman.pool.kinds import TEXT
from mlxman.pool.swap import AdapterWeights
from mlxman.settings import DEFAULT_ADAPTER_SLOTS, DEFAULT_MAX_BATCH, DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_QUEUE

if TYPE_CHECKING:
    from mlxman.pool import Hold, ModelPool

log = logging.getLogger("mlxman.server")
# How long closing one engine waits for its thread: a step, or one prefill chunk, at most.
CLOSE_SECONDS = 30.0


@dataclass(frozen=True)
class EngineSettings:
    """Set by ``serve`` for every engine: --adapter-slots, --max-lora-rank, --max-batch, --max-queue."""

    adapter_slots: int = DEFAULT_ADAPTER_SLOTS  # 0: every adapter runs swapped in, alone
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    max_rows: int = DEFAULT_MAX_BATCH
    max_queue: int = DEFAULT_MAX_QUEUE
    prefill_step_size: int = DEFAULT_PREFILL_STEP


class PoolGrant:
    """An engine's memory as the pool accounts it: slots plus batch KV, on the base's entry."""

    def __init__(self, pool: ModelPool, key: str, bank: SlotBank | None) -> None:
        self.pool, self.key, self.bank = pool, key, bank

    def resize(self, nbytes: int) -> bool:
        # The engine asks for slots plus KV in one sum; while a slot is being written the bank has not grown
        # yet, so its growth is counted as KV until the next resize.
        slots = min(self.bank.nbytes if self.bank is not None else 0, nbytes)
        return self.pool.grant(self.key, slots, nbytes - slots)

    @property
    def ceiling(self) -> int:
        """The budget less this base's weights and slots and what is pinned elsewhere: never more."""
        status = self.pool.status()
        held = 0
        for e in status.entries:
            if e.key == self.key:
                held += max(e.estimated_bytes, e.measured_bytes or 0) + e.slot_bytes
            elif e.pinned or e.parent == self.key:
                held += e.accounted_bytes
        return max(status.budget_bytes - held, 0)


class EngineThreads:
    """Long-lived threads running engine loops, one engine at a time each; an unloaded base's thread runs the
    next engine. There are never more than the engines alive at once (at most one per resident base)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None] | None]] = []
        self._threads: list[tuple[threading.Thread, queue.SimpleQueue[Callable[[], None] | None]]] = []

    def run(self, loop: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                inbox = self._idle.pop()
            else:
                inbox = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._serve, args=(inbox,), name=f"mlxman-engine-{len(self._threads)}", daemon=True
                )
                self._threads.append((thread, inbox))
                thread.start()
        inbox.put(loop)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        try:
            with mx.stream(generation_stream):
                while (loop := inbox.get()) is not None:
                    try:
                        loop()
                    except BaseException:  # an engine reports its own failures; this one is a bug
                        log.exception("an engine loop failed")
                    with self._lock:
                        self._idle.append(inbox)
        finally:
            mx.clear_streams()  # see Engine._run: streams must not outlive their thread

    @property
    def count(self) -> int:
        return len(self._threads)

    def close(self, timeout: float) -> bool:
        """End the threads once their engines have ended; True when all have."""
        with self._lock:
            threads = list(self._threads)
        for _, inbox in threads:
            inbox.put(None)
        for thread, _ in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread, _ in threads)


class Engines:
    """The engines of one pool's bases, keyed by the entry holding the model weights."""

    def __init__(self, pool: ModelPool, settings: EngineSettings | None = None) -> None:
        self.pool = pool
        self.settings = settings or EngineSettings()
        self._engines: dict[str, Engine | None] = {}  # None: this base cannot batch (its own path)
        self._lock = threading.Lock()
        # Held while an engine starts; never while freeing, which may run on an engine's own thread.
        self._starting = threading.Lock()
        self._closed = False
        self.threads = EngineThreads()
        pool.watch(self._on_free)

    def engine_for(self, hold: Hold) -> Engine | None:
        """The engine of ``hold``'s base, started on first use; None when its requests cannot batch."""
        if hold.kind != TEXT:
            return None
        key = hold.base_key
        with self._lock:
            if key in self._engines:
                return self._engines[key]
        with self._starting:
            with self._lock:
                if self._closed:
                    raise EngineClosed("The server is stopping", "retry once it is running again")
                if key in self._engines:
                    return self._engines[key]
            engine = self._start(hold)
            with self._lock:
                self._engines[key] = engine
        return engine

    def _start(self, hold: Hold) -> Engine | None:
        from mlxman.engine.batching import cannot_batch

        why = cannot_batch(hold.model)
        if why is not None:
            log.info("%s runs one request at a time: %s", hold.base_key, why)
            return None
        s = self.settings
        slots = s.adapter_slots
        bank = SlotBank(hold.model, slots=slots, max_rank=s.max_lora_rank) if slots > 0 else None
        config = EngineConfig(
            max_rows=s.max_rows,
            max_queue=s.max_queue,
            prefill_step_size=s.prefill_step_size,
            kv_bytes_per_token=hold.kv_bytes_per_token,
            admission_timeout=self.pool.admission_timeout,
        )
        grant = PoolGrant(self.pool, hold.base_key, bank)
        try:
            return Engine(
                hold.model,
                hold.tokenizer,
                bank=bank,
                config=config,
                grant=grant,
                name=hold.base_key,
                runner=self.threads,
            )
        except Exception as exc:  # serve it the one-request way rather than not at all
            log.warning("%s runs one request at a time: its engine did not start (%s)", hold.base_key, exc)
            return None

    def _on_free(self, key: str, parent: str | None, adapter: AdapterWeights | None) -> None:
        """The pool is about to free ``key``: close its engine first, or clear its adapter's slot."""
        with self._lock:
            engine = self._engines.get(parent if parent is not None else key)
            if parent is None:
                self._engines.pop(key, None)
        if engine is None:
            return
        if parent is None:
            engine.close(EngineClosed("The model was unloaded", "retry the request"), CLOSE_SECONDS)
        elif adapter is not None:
            engine.forget(adapter)

    def status(self) -> dict[str, dict[str, Any]]:
        """Each base's engine: rows running and waiting, slot and KV bytes, steps and tokens so far."""
        with self._lock:
            engines = {k: e for k, e in self._engines.items() if e is not None}
        return {k: {**dataclasses.asdict(e.status()), "alive": e.alive} for k, e in engines.items()}

    def close(self, reason: BaseException | None, timeout: float) -> bool:
        """Close every engine (their rows end with ``reason``); True when every engine thread has ended."""
        with self._lock:
            self._closed = True
            engines = [e for e in self._engines.values() if e is not None]
            self._engines.clear()
        for engine in engines:
            engine.close(reason, timeout)
        ended = not any(engine.alive for engine in engines)
        return self.threads.close(timeout) and ended
