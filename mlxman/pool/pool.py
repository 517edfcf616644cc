"""The thread-safe pool: single-flight loads, one lock per base, in-use counts, eviction and keep-alive."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxman.adapters.config import read_adapter_config
from mlxman.adapters.formats import FINE_TUNE_TYPES
from mlxman.errors import AdapterError, MemoryBudgetError, MlxmanError, NotFoundError
from mlxman.memory import format_bytes, system_memory
from mlxman.models.resolve import read_config
from mlxman.pool import loaders, policy
from mlxman.pool.estimate import adapter_bytes, model_footprint
from mlxman.pool.keys import Target, resolve_target
from mlxman.pool.kinds import TEXT, VISION, check_adapter_allowed, resolve_kind
from mlxman.pool.swap import AdapterWeights, Applied, SwapResult, check_applicable, read_adapter, swap
from mlxman.settings import DEFAULT_CONTEXT_TOKENS, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_MODELS


@dataclass(frozen=True)
class Lease:
    """A model ready to generate with, held (not swappable, not evictable) until the ``with`` block ends."""

    key: str
    base_key: str
    kind: str
    model: Any
    tokenizer: Any
    adapter: Path | None
    base_was_resident: bool
    load_seconds: float
    swap_seconds: float
    swap_mode: str


@dataclass(frozen=True)
class EntryStatus:
    key: str
    kind: str
    parent: str | None
    estimated_bytes: int
    measured_bytes: int | None
    kv_bytes: int
    adapters: list[str]
    applied_adapter: str | None
    pinned: bool
    in_use: int
    last_used: float
    keep_alive: float
    expires_at: float | None
    expires_in: float | None

    @property
    def accounted_bytes(self) -> int:
        """What the pool counts against its budget: measured weights when known, plus KV headroom."""
        weights = self.measured_bytes if self.measured_bytes is not None else self.estimated_bytes
        return weights + self.kv_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accounted_bytes": self.accounted_bytes}


@dataclass(frozen=True)
class PoolStatus:
    entries: list[EntryStatus]
    budget_bytes: int
    used_bytes: int
    available_bytes: int
    model_count: int
    max_models: int
    keep_alive: float
    context_tokens: int

    @property
    def free_bytes(self) -> int:
        return max(self.budget_bytes - self.used_bytes, 0)

    def as_dict(self, budget: dict[str, Any] | None = None) -> dict[str, Any]:
        """Plain data, as the server's pool endpoint and ``--json`` listings give it."""
        data = asdict(self)
        data["entries"] = [e.as_dict() for e in self.entries]
        data["free_bytes"] = self.free_bytes
        data["budget"] = budget or {}
        return data


@dataclass(frozen=True)
class Estimate:
    """Would a load fit, what it needs, and what would be evicted for it; nothing is loaded to answer."""

    key: str
    kind: str
    fits: bool
    weights_bytes: int
    adapters_bytes: int
    kv_bytes: int
    limit_bytes: int
    in_use_bytes: int
    available_bytes: int
    would_evict: list[str]
    resident: list[str]
    reason: str = ""

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.adapters_bytes + self.kv_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "needed_bytes": self.needed_bytes}


@dataclass(eq=False)
class _Entry:
    key: str
    kind: str
    path: Path
    parent: _Entry | None
    estimated_bytes: int
    kv_bytes: int
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

    @property
    def accounted(self) -> int:
        weights = self.measured_bytes if self.measured_bytes is not None else self.estimated_bytes
        return weights + self.kv_bytes


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
    try:
        from mlxman.adapters.validate import validate_adapter  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
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
        clock: Callable[[], float] = time.monotonic,
        available_memory: Callable[[], int] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.keep_alive = keep_alive
        self.max_models = max_models
        self.context_tokens = context_tokens
        self._clock = clock
        self._available = available_memory or _default_available
        self._entries: dict[str, _Entry] = {}
        self._flights: dict[str, _Flight] = {}
        self._reserved: dict[str, int] = {}
        self._lock = threading.RLock()
        # One load at a time, so each entry's active-memory delta is its own.
        self._load_lock = threading.Lock()

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
            base, base_resident, load_seconds = self._reserve(plan, plan.model_key, keep_alive)
            held.append(base)
            child: _Entry | None = None
            if plan.mode == "child":
                child, _, child_seconds = self._reserve(plan, plan.key, keep_alive)
                held.append(child)
                load_seconds += child_seconds
            assert base.loaded is not None
            with base.lock:
                try:
                    result = self._swap_to(base, child)
                except AdapterError:
                    failed_child = child
                    raise
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
                )
        finally:
            self._release(held, keep_alive)
            if failed_child is not None:
                # An adapter that cannot be applied stays out of the pool; the base is left plain.
                self._drop_if_idle(failed_child)

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
            base, _, _ = self._reserve(plan, plan.model_key, keep_alive)
            held.append(base)
            target = base
            if plan.mode == "child":
                target, _, _ = self._reserve(plan, plan.key, keep_alive)
                held.append(target)
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
                raise MlxmanError(
                    f"'{entry.key}' is in use by {sum(e.in_use for e in busy)} request(s), so it cannot go",
                    "wait for the requests to finish, then unload it again",
                )
            for e in group:
                del self._entries[e.key]
        self._free(group)

    def pin(self, key: str) -> None:
        with self._lock:
            self._lookup(key).pinned = True

    def unpin(self, key: str) -> None:
        with self._lock:
            self._lookup(key).pinned = False

    def estimate(self, model: str, adapters: Sequence[str] = (), *, kind: str | None = None) -> Estimate:
        """Would ``model`` with ``adapters`` fit now, and what would be evicted for it? Reads headers only."""
        plans = [self._plan(model, a, kind) for a in adapters] or [self._plan(model, None, kind)]
        with self._lock:
            resident = set(self._entries)
        weights = kv = adapters_total = 0
        counted: set[str] = set()
        adds_model = False
        for plan in plans:
            if plan.model_key not in resident and plan.model_key not in counted:
                counted.add(plan.model_key)
                adds_model = True
                footprint = model_footprint(
                    plan.target.model.path,
                    read_config(plan.target.model.path),
                    plan.kind,
                    self.context_tokens,
                )
                weights += footprint.weights_bytes
                kv += footprint.kv_bytes
                if plan.mode == "own" and plan.target.adapter is not None:
                    adapters_total += adapter_bytes(plan.target.adapter)
            if plan.mode == "child" and plan.key not in resident and plan.key not in counted:
                counted.add(plan.key)
                adapters_total += adapter_bytes(plan.target.adapter)  # type: ignore[arg-type]
        needed = weights + kv + adapters_total
        with self._lock:
            adm = self._admission(needed, adds_model)
        return Estimate(
            key=plans[0].target.base_key if adapters else plans[0].key,
            kind=plans[0].kind,
            fits=adm.fits,
            weights_bytes=weights,
            adapters_bytes=adapters_total,
            kv_bytes=kv,
            limit_bytes=self.budget_bytes,
            in_use_bytes=adm.in_use,
            available_bytes=adm.available,
            would_evict=adm.victims,
            resident=sorted(
                k for k in resident if k in {p.key for p in plans} | {p.model_key for p in plans}
            ),
            reason=adm.reason,
        )

    def expire(self) -> list[str]:
        """Unload idle entries whose keep-alive has run out; return their keys."""
        with self._lock:
            keys = policy.expired(self._views(), self._clock())
            gone = [self._entries.pop(k) for k in keys]
        self._free(gone)
        return keys

    def status(self) -> PoolStatus:
        with self._lock:
            now = self._clock()
            entries = [self._entry_status(e, now) for e in self._entries.values()]
            used = sum(e.accounted for e in self._entries.values()) + sum(self._reserved.values())
            models = sum(1 for e in self._entries.values() if e.parent is None)
        return PoolStatus(
            entries=entries,
            budget_bytes=self.budget_bytes,
            used_bytes=used,
            available_bytes=self._available(),
            model_count=models,
            max_models=self.max_models,
            keep_alive=self.keep_alive,
            context_tokens=self.context_tokens,
        )

    def close(self) -> None:
        """Unload everything (in-use entries included: callers must be done with their leases)."""
        with self._lock:
            gone = list(self._entries.values())
            self._entries.clear()
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

    def _reserve(self, plan: _Plan, key: str, keep_alive: float | None) -> tuple[_Entry, bool, float]:
        """Return the entry for ``key`` with its in-use count raised, loading it first (once) when missing."""
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
                entry = self._load_entry(plan, key, keep_alive)
            except BaseException as exc:
                flight.error = exc
                raise
            finally:
                with self._lock:
                    self._flights.pop(key, None)
                    flight.done.set()
            return entry, False, time.perf_counter() - started

    def _load_entry(self, plan: _Plan, key: str, keep_alive: float | None) -> _Entry:
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
            estimated, kv, adds_model = adapter_bytes(adapter_dir), 0, False
        else:
            base = None
            if plan.target.adapter is not None:
                _validate_adapter(plan.target.adapter, path)
            footprint = model_footprint(path, read_config(path), plan.kind, self.context_tokens)
            estimated, kv, adds_model = footprint.weights_bytes, footprint.kv_bytes, True
            if plan.mode == "own" and plan.kind == VISION and plan.target.adapter is not None:
                estimated += adapter_bytes(plan.target.adapter)
        self._admit(key, estimated + kv, adds_model)
        try:
            loaders.import_loader(TEXT if base is not None else plan.kind)
            with self._load_lock:
                # Free what earlier work left for the collector first, or its release would blur the delta.
                gc.collect()
                before = mx.get_active_memory()
                loaded: loaders.LoadedModel | None = None
                weights: AdapterWeights | None = None
                if base is not None:
                    weights = read_adapter(plan.target.adapter)  # type: ignore[arg-type]
                else:
                    adapter = plan.target.adapter if plan.mode == "own" else None
                    loaded = loaders.load_model(path, plan.kind, adapter)
                measured = max(mx.get_active_memory() - before, 0)
            entry = _Entry(
                key=key,
                kind=plan.kind,
                path=plan.target.adapter if base is not None else path,  # type: ignore[arg-type]
                parent=base,
                estimated_bytes=estimated,
                kv_bytes=kv,
                measured_bytes=measured,
                last_used=self._clock(),
                keep_alive=ka,
                in_use=1,
                loaded=loaded,
                adapter=weights,
            )
            with self._lock:
                self._entries[key] = entry
            return entry
        except BaseException:
            loaded = weights = None
            gc.collect()
            mx.clear_cache()
            raise
        finally:
            with self._lock:
                self._reserved.pop(key, None)

    def _admit(self, key: str, needed: int, adds_model: bool) -> None:
        with self._lock:
            adm = self._admission(needed, adds_model)
            if not adm.fits:
                raise self._refusal(key, adm)
            victims = [self._entries[k] for unit in adm.victims for k in self._unit_keys(unit)]
            for e in victims:
                del self._entries[e.key]
            self._reserved[key] = needed
        self._free(victims)

    def _admission(self, needed: int, adds_model: bool) -> policy.Admission:
        reserved = sum(self._reserved.values())
        return policy.admit(
            self._views(),
            needed,
            self.budget_bytes,
            self._available() - reserved,
            max_models=self.max_models,
            adds_model=adds_model,
            reserved=reserved,
        )

    def _refusal(self, key: str, adm: policy.Admission) -> MemoryBudgetError:
        need, limit = format_bytes(adm.needed), format_bytes(adm.limit)
        if adm.reason == "larger than the pool limit":
            return MemoryBudgetError(
                f"'{key}' needs {need} but the pool limit is {limit}",
                "raise --memory-limit, lower the context size, or use a smaller (quantized) model",
            )
        if adm.reason == "too many models":
            return MemoryBudgetError(
                f"'{key}' would be model {adm.models_to_free + self.max_models} but the pool holds at most "
                f"{self.max_models}, and no resident model is idle and unpinned",
                "raise --max-models, or unpin or unload a model",
            )
        could = ", ".join(f"'{k}'" for k in adm.evictable) or "nothing (every entry is pinned or in use)"
        return MemoryBudgetError(
            f"'{key}' needs {need} but the pool limit is {limit} with {format_bytes(adm.in_use)} in use and "
            f"{format_bytes(adm.available)} available on this machine; unloading {could} would free only "
            f"{format_bytes(adm.evictable_bytes)} of the {format_bytes(adm.to_free)} needed",
            "raise --memory-limit, unpin or unload entries (`mlxman pool unload`), or lower the context size",
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

    def _release(self, held: list[_Entry], keep_alive: float | None) -> None:
        if not held:
            return
        now = self._clock()
        due = False
        with self._lock:
            for e in held:
                e.in_use -= 1
                e.last_used = now
                if keep_alive is not None:
                    e.keep_alive = keep_alive
                deadline = policy.expires_at(e.last_used, e.keep_alive)
                due = due or (deadline is not None and deadline <= now)
        if due:
            self.expire()

    def _drop_if_idle(self, entry: _Entry) -> None:
        with self._lock:
            if self._entries.get(entry.key) is not entry or entry.in_use or entry.pinned:
                return
            del self._entries[entry.key]
        self._free([entry])

    def _free(self, gone: list[_Entry]) -> None:
        """Drop references to unloaded entries (stripping an applied adapter off its base), free MLX."""
        if not gone:
            return
        for e in gone:
            base = e.parent
            if base is not None and base.applied is e and base not in gone:
                with base.lock:
                    if base.applied is e and base.loaded is not None:
                        swap(base.loaded.model, base.applied_state, None)
                        base.applied, base.applied_state = None, None
        for e in gone:
            e.loaded = None
            e.adapter = None
            e.applied, e.applied_state = None, None
        gc.collect()
        mx.clear_cache()

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
            adapters=[c.key for c in self._children(e)],
            applied_adapter=e.applied.key if e.applied is not None else None,
            pinned=e.pinned,
            in_use=e.in_use,
            last_used=e.last_used,
            keep_alive=e.keep_alive,
            expires_at=deadline,
            expires_in=None if deadline is None else max(deadline - now, 0.0),
        )
