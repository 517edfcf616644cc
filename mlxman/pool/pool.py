"""The thread-safe pool: single-flight loads, one lock per base, in-use counts, eviction and keep-alive."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx

from mlxman.adapters.config import read_adapter_config
from mlxman.adapters.formats import FINE_TUNE_TYPES
from mlxman.adapters.validate import validate_adapter
from mlxman.errors import AdapterError, InUseError, MemoryBudgetError, MlxmanError, NotFoundError
from mlxman.memory import format_bytes, system_memory
from mlxman.models.resolve import read_config
from mlxman.pool import loaders, policy
from mlxman.pool.estimate import adapter_bytes, model_context, model_footprint
from mlxman.pool.keys import Target, resolve_target
from mlxman.pool.kinds import TEXT, VISION, check_adapter_allowed, resolve_kind
from mlxman.pool.swap import AdapterWeights, Applied, SwapResult, check_applicable, read_adapter, swap
from mlxman.pool.views import EntryStatus, Estimate, FreeWatcher, Hold, Lease, PoolStatus
from mlxman.settings import (
    DEFAULT_ADMISSION_TIMEOUT,
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_MODELS,
)

# How long a free polls for a base's lock while its holder swaps the freed adapter off (never a generation).
STRIP_POLL_SECONDS = 0.001


@dataclass(eq=False)
class _Entry:
    key: str
    kind: str
    path: Path
    parent: _Entry | None
    estimated_bytes: int
    kv_bytes: int
    context_tokens: int
    measured_bytes: int | None
    last_used: float
    keep_alive: float
    pinned: bool = False
    in_use: int = 0
    loaded: loaders.LoadedModel | None = None
    adapter: AdapterWeights | None = None
    applied: _Entry | None = None
    applied_state: Applied | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    kv_bytes_per_token: int = 0
    # Granted to the engine serving this base (see ``grant``): its slots and its batch's KV.
    slot_bytes: int = 0
    batch_kv_bytes: int = 0

    @property
    def accounted(self) -> int:
        # The estimate is exact for what it covers; a measurement can only show more (arrays made at init).
        # The one context of KV admitted at load is the batch's first: only a larger batch adds more.
        weights = max(self.estimated_bytes, self.measured_bytes or 0)
        return weights + self.slot_bytes + max(self.kv_bytes, self.batch_kv_bytes)


class _Flight:
    """One load in progress; every concurrent request for its key waits here and shares its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.waiters = 0


@dataclass(frozen=True)
class _Plan:
    target: Target
    kind: str
    # "base": plain model; "child": swappable adapter on a base; "own": adapter baked into its own model.
    mode: str

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def model_key(self) -> str:
        """The key of the entry holding the model weights."""
        return self.target.key if self.mode == "own" else self.target.base_key


def _validate_adapter(adapter_dir: Path, model_dir: Path) -> None:
    report = validate_adapter(adapter_dir, model_dir)
    if not report.ok:
        findings = "".join(f"\n  - {f.line()}" for f in report.errors)
        raise AdapterError(
            f"Adapter {adapter_dir} cannot be used with {model_dir} "
            f"({len(report.errors)} error(s)):{findings}",
            f"see `mlxman adapter validate {adapter_dir} --model {model_dir}`",
        )


def _default_available() -> int:
    return system_memory().available


class ModelPool:
    """Models and adapters resident in one process's memory, under a byte budget."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        keep_alive: float = policy.parse_keep_alive(DEFAULT_KEEP_ALIVE),
        max_models: int = DEFAULT_MAX_MODELS,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        admission_timeout: float = DEFAULT_ADMISSION_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        available_memory: Callable[[], int] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.keep_alive = keep_alive
        self.max_models = max_models
        self.context_tokens = context_tokens
        self.admission_timeout = admission_timeout
        self._clock = clock
        self._available = available_memory or _default_available
        self._entries: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        # Bytes admitted for loads in flight, and bytes of entries out of the pool but not freed yet: both
        # count against the budget until the memory is really taken or really given back.
        self._reserved: dict[str, int] = {}
        self._reserved_models: set[str] = set()
        self._freeing: dict[_Entry, int] = {}
        self._lock = threading.RLock()
        # Notified whenever memory may have become available to a waiting load.
        self._memory_changed = threading.Condition(self._lock)
        self._waiting = 0
        # Open leases plus running frees, and a count of their starts and ends: a load's active-memory
        # delta is its size only when none of them ran meanwhile.
        self._busy = 0
        self._epoch = 0
        # One load at a time, so each entry's active-memory delta is its own.
        self._load_lock = threading.Lock()
        self._watchers: list[FreeWatcher] = []

    # -- public API

    @contextmanager
    def acquire(
        self,
        model: str,
        adapter: str | None = None,
        *,
        kind: str | None = None,
        keep_alive: float | None = None,
    ) -> Iterator[Lease]:
        """Load what is missing, swap the base to ``adapter`` and hold it for the ``with`` block."""
        plan = self._plan(model, adapter, kind)
        held: list[_Entry] = []
        failed_child: _Entry | None = None
        try:
            base, child, base_resident, load_seconds = self._reserve_plan(plan, keep_alive, held)
            assert base.loaded is not None
            with base.lock:
                try:
                    result = self._swap_to(base, child)
                except AdapterError:
                    failed_child = child
                    raise
                self._activity(+1)
                try:
                    yield Lease(
                        key=plan.key,
                        base_key=base.key,
                        kind=base.kind,
                        model=base.loaded.model,
                        tokenizer=base.loaded.tokenizer,
                        adapter=plan.target.adapter,
                        base_was_resident=base_resident,
                        load_seconds=load_seconds,
                        swap_seconds=result.seconds,
                        swap_mode=result.mode,
                        context_tokens=base.context_tokens,
                    )
                finally:
                    self._activity(-1)
        finally:
            self._release(held, keep_alive)
            if failed_child is not None:
                # An adapter that cannot be applied stays out of the pool; the base is left plain.
                self._drop_if_idle(failed_child)

    def hold(
        self,
        model: str,
        adapter: str | None = None,
        *,
        kind: str | None = None,
        keep_alive: float | None = None,
    ) -> Hold:
        """Load what is missing and hold it in use (not evictable) until ``release``; the base's lock is not
        taken and no adapter is swapped in: the caller (the engine) runs the base itself."""
        plan = self._plan(model, adapter, kind)
        held: list[_Entry] = []
        try:
            base, child, resident, seconds = self._reserve_plan(plan, keep_alive, held)
        except BaseException:
            self._release(held, keep_alive)
            raise
        assert base.loaded is not None
        self._activity(+1)
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self._activity(-1)
                self._release(held, keep_alive)

        return Hold(
            key=plan.key,
            base_key=base.key,
            kind=base.kind,
            model=base.loaded.model,
            tokenizer=base.loaded.tokenizer,
            adapter=child.adapter if child is not None else None,
            context_tokens=base.context_tokens,
            kv_bytes_per_token=base.kv_bytes_per_token,
            release=release,
            base_was_resident=resident,
            load_seconds=seconds,
        )

    def grant(self, key: str, slot_bytes: int, batch_kv_bytes: int) -> bool:
        """Account ``key``'s engine memory (adapter slots, batch KV) from now on; False when more does not fit
        now (idle entries are evicted for it when that is enough). Shrinking always succeeds."""
        with self._memory_changed:
            entry = self._entries.get(key)
            if entry is None:
                return True  # unloading: its engine is being closed
            before = entry.accounted
            old = entry.slot_bytes, entry.batch_kv_bytes
            entry.slot_bytes, entry.batch_kv_bytes = slot_bytes, batch_kv_bytes
            more = entry.accounted - before
            if more <= 0:
                self._memory_changed.notify_all()
                return True
            entry.slot_bytes, entry.batch_kv_bytes = old
            adm = self._admission(more, False)
            if not adm.fits or key in adm.victims:
                return False
            victims = [self._entries[k] for unit in adm.victims for k in self._unit_keys(unit)]
            self._detach(victims)
            entry.slot_bytes, entry.batch_kv_bytes = slot_bytes, batch_kv_bytes
        self._free(victims)
        return True

    def watch(self, watcher: FreeWatcher) -> None:
        """Call ``watcher`` for every entry about to be freed (an engine closes, or forgets an adapter)."""
        self._watchers.append(watcher)

    def load(
        self,
        model: str,
        adapter: str | None = None,
        *,
        pin: bool = False,
        keep_alive: float | None = None,
        kind: str | None = None,
    ) -> EntryStatus:
        """Make a model (and adapter) resident without generating; optionally pin it."""
        plan = self._plan(model, adapter, kind)
        held: list[_Entry] = []
        try:
            base, child, _, _ = self._reserve_plan(plan, keep_alive, held)
            target = child or base
            if pin:
                with self._lock:
                    target.pinned = True
        finally:
            self._release(held, keep_alive)
        with self._lock:
            return self._entry_status(target, self._clock())

    def unload(self, key: str) -> None:
        """Unload one entry; unloading a base unloads its adapter entries too."""
        with self._lock:
            entry = self._lookup(key)
            group = [*self._children(entry), entry]
            busy = [e for e in group if e.in_use]
            if busy:
                raise InUseError(
                    f"'{entry.key}' is in use by {sum(e.in_use for e in busy)} request(s), so it cannot go",
                    "wait for the requests to finish, then unload it again",
                )
            self._detach(group)
        self._free(group)

    def pin(self, key: str) -> None:
        with self._lock:
            self._lookup(key).pinned = True

    def unpin(self, key: str) -> None:
        with self._memory_changed:
            self._lookup(key).pinned = False
            self._memory_changed.notify_all()

    def estimate(self, model: str, adapters: Sequence[str] = (), *, kind: str | None = None) -> Estimate:
        """Would ``model`` with ``adapters`` fit now, and what would be evicted for it? Reads headers only."""
        plans = [self._plan(model, a, kind) for a in adapters] or [self._plan(model, None, kind)]
        with self._lock:
            resident = dict(self._entries)
        weights = kv = adapters_total = resident_bytes = 0
        context = self.context_tokens
        counted: set[str] = set()
        adds_model = False
        for plan in plans:
            if plan.model_key not in counted:
                counted.add(plan.model_key)
                entry = resident.get(plan.model_key)
                if entry is not None:
                    weights += max(entry.estimated_bytes, entry.measured_bytes or 0)
                    kv += max(entry.kv_bytes, entry.batch_kv_bytes)
                    adapters_total += entry.slot_bytes  # its engine's adapter slots
                    resident_bytes += entry.accounted
                    context = entry.context_tokens
                else:
                    adds_model = True
                    path = plan.target.model.path
                    config = read_config(path)
                    context = model_context(config, self.context_tokens)
                    footprint = model_footprint(path, config, plan.kind, context)
                    weights += footprint.weights_bytes
                    kv += footprint.kv_bytes
                    if plan.mode == "own" and plan.target.adapter is not None:
                        adapters_total += adapter_bytes(plan.target.adapter)
            if plan.mode == "child" and plan.key not in counted:
                counted.add(plan.key)
                entry = resident.get(plan.key)
                if entry is not None:
                    adapters_total += entry.accounted
                    resident_bytes += entry.accounted
                else:
                    adapters_total += adapter_bytes(plan.target.adapter)  # type: ignore[arg-type]
        found = Estimate(
            key=plans[0].target.base_key if adapters else plans[0].key,
            kind=plans[0].kind,
            fits=False,
            weights_bytes=weights,
            adapters_bytes=adapters_total,
            kv_bytes=kv,
            limit_bytes=self.budget_bytes,
            in_use_bytes=0,
            available_bytes=0,
            would_evict=[],
            resident=sorted(k for k in resident if k in counted),
            resident_bytes=resident_bytes,
            context_tokens=context,
        )
        with self._lock:
            adm = self._admission(found.needed_bytes, adds_model)
        return replace(
            found,
            fits=adm.fits,
            in_use_bytes=adm.in_use,
            available_bytes=adm.available,
            would_evict=adm.victims,
            reason=adm.reason,
        )

    def expire(self) -> list[str]:
        """Unload idle entries whose keep-alive has run out; return their keys."""
        with self._lock:
            keys = policy.expired(self._views(), self._clock())
            gone = [self._entries[k] for k in keys]
            self._detach(gone)
        self._free(gone)
        return keys

    def status(self) -> PoolStatus:
        with self._lock:
            now = self._clock()
            entries = [self._entry_status(e, now) for e in self._entries.values()]
            models = sum(1 for e in self._entries.values() if e.parent is None)
            used = self._used()
            waiting = self._waiting
        return PoolStatus(
            entries=entries,
            budget_bytes=self.budget_bytes,
            used_bytes=used,
            available_bytes=self._available(),
            model_count=models,
            max_models=self.max_models,
            keep_alive=self.keep_alive,
            context_tokens=self.context_tokens,
            waiting=waiting,
            admission_timeout=self.admission_timeout,
        )

    def close(self) -> None:
        """Unload everything (in-use entries included: callers must be done with their leases)."""
        with self._lock:
            gone = list(self._entries.values())
            self._detach(gone)
        self._free(gone)

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning

    def _plan(self, model: str, adapter: str | None, kind: str | None) -> _Plan:
        target = resolve_target(model, adapter)
        with self._lock:
            resident = self._entries.get(target.key)
        if resident is not None and kind in (None, resident.kind):
            # Known from its load: no need to read its config files again on every request.
            mode = "child" if resident.parent is not None else "own" if target.adapter else "base"
            return _Plan(target, resident.kind, mode)
        path = target.model.path
        resolved_kind = resolve_kind(path, read_config(path), kind)
        if target.adapter is None:
            return _Plan(target, resolved_kind, "base")
        check_adapter_allowed(resolved_kind, target.base_key)
        adapter_config = read_adapter_config(target.adapter)
        check_applicable(target.adapter, adapter_config)
        fine_tune_type = adapter_config.get("fine_tune_type", "lora")
        if fine_tune_type not in FINE_TUNE_TYPES:
            _validate_adapter(target.adapter, path)  # lists every finding, not only this one
            raise AdapterError(
                f"Adapter {target.adapter} has unknown fine_tune_type {fine_tune_type!r}",
                f"use one of: {', '.join(FINE_TUNE_TYPES)}",
            )
        # Full fine-tunes replace base tensors; mlx-vlm adapters have their own format: own models, both.
        own = fine_tune_type == "full" or resolved_kind == VISION
        return _Plan(target, resolved_kind, "own" if own else "child")

    # -- reservation and single-flight loads

    def _reserve_plan(
        self, plan: _Plan, keep_alive: float | None, held: list[_Entry]
    ) -> tuple[_Entry, _Entry | None, bool, float]:
        """Reserve the plan's model entry, then its adapter entry when it is a child; each joins ``held`` (the
        caller releases them). Returns base, child (or None), whether the base was resident, load seconds."""
        base, resident, seconds = self._reserve(plan, plan.model_key, keep_alive, held)
        held.append(base)
        child: _Entry | None = None
        if plan.mode == "child":
            child, _, child_seconds = self._reserve(plan, plan.key, keep_alive, held)
            held.append(child)
            seconds += child_seconds
        return base, child, resident, seconds

    def _reserve(
        self, plan: _Plan, key: str, keep_alive: float | None, held: Sequence[_Entry]
    ) -> tuple[_Entry, bool, float]:
        """Return the entry for ``key`` with its in-use count raised, loading it first (once) when missing.

        ``held`` are the entries the caller already holds (the base, when ``key`` is its adapter).
        """
        started = time.perf_counter()
        waited = False
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.in_use += 1
                    return entry, not waited, time.perf_counter() - started if waited else 0.0
                flight = self._flights.get(key)
                owner = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
                else:
                    flight.waiters += 1
            if not owner:
                waited = True
                flight.done.wait()
                if flight.error is not None:
                    raise flight.error
                continue
            try:
                entry = self._load_entry(plan, key, keep_alive, held)
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                    flight.done.set()
            return entry, False, time.perf_counter() - started

    def _load_entry(self, plan: _Plan, key: str, keep_alive: float | None, held: Sequence[_Entry]) -> _Entry:
        """Admit, evict, load and insert one entry, reserved for the caller. Runs in the flight's owner."""
        ka = self.keep_alive if keep_alive is None else keep_alive
        path = plan.target.model.path
        if key == plan.key and plan.mode == "child":
            adapter_dir = plan.target.adapter
            assert adapter_dir is not None
            with self._lock:
                base = self._entries.get(plan.target.base_key)
            if base is None:
                raise NotFoundError(
                    f"Base '{plan.target.base_key}' left the pool while its adapter loaded", "retry"
                )
            _validate_adapter(adapter_dir, path)
            estimated, kv, context, adds_model = adapter_bytes(adapter_dir), 0, base.context_tokens, False
            per_token = 0
        else:
            base = None
            if plan.target.adapter is not None:
                _validate_adapter(plan.target.adapter, path)
            config = read_config(path)
            context = model_context(config, self.context_tokens)
            footprint = model_footprint(path, config, plan.kind, context)
            estimated, kv, adds_model = footprint.weights_bytes, footprint.kv_bytes, True
            per_token = footprint.kv_bytes_per_token
            if plan.mode == "own" and plan.kind == VISION and plan.target.adapter is not None:
                estimated += adapter_bytes(plan.target.adapter)
        self._admit(key, estimated + kv, adds_model, held)
        try:
            loaders.import_loader(TEXT if base is not None else plan.kind)
            with self._load_lock:
                # Free what earlier work left for the collector first, or its release would blur the delta.
                gc.collect()
                with self._lock:
                    quiet, epoch = self._busy == 0, self._epoch
                before = mx.get_active_memory()
                loaded: loaders.LoadedModel | None = None
                weights: AdapterWeights | None = None
                if base is not None:
                    weights = read_adapter(plan.target.adapter)  # type: ignore[arg-type]
                else:
                    adapter = plan.target.adapter if plan.mode == "own" else None
                    loaded = loaders.load_model(path, plan.kind, adapter)
                delta = mx.get_active_memory() - before
                with self._lock:
                    # Active memory is process-wide: a lease or a free meanwhile moved it too.
                    quiet = quiet and self._epoch == epoch
            entry = _Entry(
                key=key,
                kind=plan.kind,
                path=plan.target.adapter if base is not None else path,  # type: ignore[arg-type]
                parent=base,
                estimated_bytes=estimated,
                kv_bytes=kv,
                kv_bytes_per_token=per_token,
                context_tokens=context,
                measured_bytes=max(delta, 0) if quiet else None,
                last_used=self._clock(),
                keep_alive=ka,
                in_use=1,
                loaded=loaded,
                adapter=weights,
            )
            with self._memory_changed:
                # In one step, so the bytes are never counted twice nor dropped.
                self._entries[key] = entry
                self._reserved.pop(key, None)
                self._reserved_models.discard(key)
                self._memory_changed.notify_all()
        except BaseException:
            loaded = weights = None
            gc.collect()
            mx.clear_cache()
            raise
        finally:
            with self._memory_changed:
                self._reserved_models.discard(key)
                if self._reserved.pop(key, None) is not None:
                    self._memory_changed.notify_all()
        if entry.accounted > estimated + kv:
            self._settle()
        return entry

    def _admit(self, key: str, needed: int, adds_model: bool, held: Sequence[_Entry]) -> None:
        """Reserve ``needed`` bytes, evicting for them; wait while requests in flight hold what must go.

        What cannot fit even once every other request has ended is refused at once; a wait that outlasts
        ``admission_timeout`` is refused too, which also ends waits on each other (see docs/pool.md).
        """
        deadline: float | None = None
        with self._memory_changed:
            while True:
                adm = self._admission(needed, adds_model)
                if adm.fits:
                    break
                if not self._admission(needed, adds_model, settled=held).fits:
                    raise self._refusal(key, adm)
                now = time.monotonic()
                deadline = now + self.admission_timeout if deadline is None else deadline
                if now >= deadline:
                    raise self._refusal(key, adm, waited=self.admission_timeout)
                self._waiting += 1
                try:
                    self._memory_changed.wait(deadline - now)
                finally:
                    self._waiting -= 1
            victims = [self._entries[k] for unit in adm.victims for k in self._unit_keys(unit)]
            self._detach(victims)
            # Until the victims are freed their bytes stay counted, and this load holds only the rest;
            # then it holds all it needs (see _free).
            self._reserved[key] = max(needed - sum(self._freeing[e] for e in victims), 0)
            if adds_model:
                self._reserved_models.add(key)
        self._free(victims, heir=(key, needed))

    def _admission(
        self, needed: int, adds_model: bool, *, settled: Sequence[_Entry] | None = None
    ) -> policy.Admission:
        """The verdict now; with ``settled`` (what the caller holds), once every other request has ended."""
        reserved = sum(self._reserved.values())
        views = self._views()
        if settled is None:
            return policy.admit(
                views,
                needed,
                self.budget_bytes,
                self._available() - reserved,
                max_models=self.max_models,
                adds_model=adds_model,
                reserved=reserved + sum(self._freeing.values()),
                reserved_models=len(self._reserved_models),
            )
        # Loads in flight become entries, and frees finish; only pins and the caller's own holds stay.
        holds = [e.key for e in settled]
        views = [replace(v, in_use=holds.count(v.key)) for v in views]
        return policy.admit(
            views,
            needed,
            self.budget_bytes,
            self._available(),
            max_models=self.max_models,
            adds_model=adds_model,
        )

    def _settle(self) -> None:
        """A load measured more than its estimate: evict idle entries until the pool is within its budget."""
        with self._lock:
            adm = self._admission(0, False)
            victims = [self._entries[k] for unit in adm.victims for k in self._unit_keys(unit)]
            self._detach(victims)
        self._free(victims)

    def _refusal(self, key: str, adm: policy.Admission, waited: float | None = None) -> MemoryBudgetError:
        need, limit = format_bytes(adm.needed), format_bytes(adm.limit)
        if adm.reason == "larger than the pool limit":
            return MemoryBudgetError(
                f"'{key}' needs {need} but the pool limit is {limit}",
                "raise --memory-limit, lower --context-length, or use a smaller (quantized) model",
            )
        after = f" after waiting {waited:g} s for requests in flight" if waited is not None else ""
        if adm.reason == "too many models":
            return MemoryBudgetError(
                f"'{key}' would be model {adm.models_to_free + self.max_models} but the pool holds at most "
                f"{self.max_models}, and no resident model is idle and unpinned{after}",
                "raise --max-models, or unpin or unload a model",
            )
        could = ", ".join(f"'{k}'" for k in adm.evictable) or "nothing (every entry is pinned or in use)"
        message = (
            f"'{key}' needs {need} but the pool limit is {limit} with {format_bytes(adm.in_use)} in use and "
            f"{format_bytes(adm.available)} available on this machine; unloading {could} would free only "
            f"{format_bytes(adm.evictable_bytes)} of the {format_bytes(adm.to_free)} needed"
        )
        if waited is not None:
            return MemoryBudgetError(
                f"{message} (waited {waited:g} s for requests in flight to release memory)",
                "retry when fewer requests run, raise --memory-limit, or lower --context-length",
            )
        return MemoryBudgetError(
            message,
            "raise --memory-limit, unpin or unload entries (`mlxman pool unload`), or lower --context-length",
        )

    # -- swapping, release, freeing

    def _swap_to(self, base: _Entry, child: _Entry | None) -> SwapResult:
        """Under the base's lock: make ``child``'s adapter the one applied (None = plain base)."""
        assert base.loaded is not None
        nxt = child.adapter if child is not None else None
        try:
            result = swap(base.loaded.model, base.applied_state, nxt)
        except BaseException:
            base.applied, base.applied_state = None, None
            raise
        base.applied, base.applied_state = (child, result.applied) if nxt is not None else (None, None)
        return result

    def _activity(self, step: int) -> None:
        with self._lock:
            self._busy += step
            self._epoch += 1

    def _release(self, held: list[_Entry], keep_alive: float | None) -> None:
        if not held:
            return
        now = self._clock()
        due = False
        with self._memory_changed:
            for e in held:
                e.in_use -= 1
                e.last_used = now
                if keep_alive is not None:
                    e.keep_alive = keep_alive
                deadline = policy.expires_at(e.last_used, e.keep_alive)
                due = due or (deadline is not None and deadline <= now)
            self._memory_changed.notify_all()
        if due:
            self.expire()

    def _drop_if_idle(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.key) is not entry or entry.in_use or entry.pinned:
                return
            self._detach([entry])
        self._free([entry])

    def _detach(self, gone: Sequence[_Entry]) -> None:
        """Under the pool's lock: take entries out of the pool; their bytes count until ``_free`` ends."""
        for e in gone:
            del self._entries[e.key]
            self._freeing[e] = e.accounted

    def _free(self, gone: Sequence[_Entry], heir: tuple[str, int] | None = None) -> None:
        """Drop references to detached entries (stripping an applied adapter off its base), free MLX memory.

        Then their bytes stop counting; ``heir`` (a load that evicted them) then holds all it needs.
        """
        try:
            if gone:
                self._activity(+1)
                try:
                    for e in gone:
                        for watcher in self._watchers:
                            watcher(e.key, e.parent.key if e.parent is not None else None, e.adapter)
                    for e in gone:
                        if e.parent is not None and e.parent not in gone:
                            self._strip(e.parent, e)
                    for e in gone:
                        e.loaded = None
                        e.adapter = None
                        e.applied, e.applied_state = None, None
                    gc.collect()
                    mx.clear_cache()
                finally:
                    self._activity(-1)
        finally:
            with self._memory_changed:
                for e in gone:
                    self._freeing.pop(e, None)
                if heir is not None:
                    self._reserved[heir[0]] = heir[1]
                self._memory_changed.notify_all()

    def _strip(self, base: _Entry, gone: _Entry) -> None:
        """Take ``gone``'s adapter off ``base`` without waiting for any generation.

        A lease swaps first thing under the base's lock, before it generates. So while ``gone`` is still
        applied, a holder of the lock is about to replace it: poll until it has, or strip here once the
        lock is free.
        """
        while base.applied is gone:
            if base.lock.acquire(timeout=STRIP_POLL_SECONDS):
                try:
                    if base.applied is gone and base.loaded is not None:
                        swap(base.loaded.model, base.applied_state, None)
                        base.applied, base.applied_state = None, None
                finally:
                    base.lock.release()
                return

    def _used(self) -> int:
        return (
            sum(e.accounted for e in self._entries.values())
            + sum(self._reserved.values())
            + sum(self._freeing.values())
        )

    # -- views

    def _views(self) -> list[policy.EntryView]:
        return [
            policy.EntryView(
                key=e.key,
                nbytes=e.accounted,
                last_used=e.last_used,
                parent=e.parent.key if e.parent is not None else None,
                pinned=e.pinned,
                in_use=e.in_use,
                keep_alive=e.keep_alive,
            )
            for e in self._entries.values()
        ]

    def _children(self, entry: _Entry) -> list[_Entry]:
        return [e for e in self._entries.values() if e.parent is entry]

    def _unit_keys(self, unit_key: str) -> list[str]:
        entry = self._entries[unit_key]
        return [*(c.key for c in self._children(entry)), entry.key]

    def _lookup(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            try:
                entry = self._entries.get(resolve_target(key).key)
            except MlxmanError:
                entry = None
        if entry is None:
            raise NotFoundError(
                f"'{key}' is not loaded in the pool", "see `mlxman pool status` for the loaded keys"
            )
        return entry

    def _entry_status(self, e: _Entry, now: float) -> EntryStatus:
        deadline = policy.expires_at(e.last_used, e.keep_alive)
        return EntryStatus(
            key=e.key,
            kind=e.kind,
            parent=e.parent.key if e.parent is not None else None,
            estimated_bytes=e.estimated_bytes,
            measured_bytes=e.measured_bytes,
            kv_bytes=e.kv_bytes,
            context_tokens=e.context_tokens,
            adapters=[c.key for c in self._children(e)],
            applied_adapter=e.applied.key if e.applied is not None else None,
            pinned=e.pinned,
            in_use=e.in_use,
            last_used=e.last_used,
            keep_alive=e.keep_alive,
            expires_at=deadline,
            expires_in=None if deadline is None else max(deadline - now, 0.0),
            slot_bytes=e.slot_bytes,
            batch_kv_bytes=e.batch_kv_bytes,
        )
