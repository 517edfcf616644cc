"""The pool under real threads: true accounting during frees, waits for memory, none on a generation."""

from __future__ import annotations

import gc
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlxman.demo import DemoKit
from mlxman.errors import InUseError, MemoryBudgetError, NotFoundError
from mlxman.pool import ModelPool, loaders
from tests.test_pool_pool import GIB, copy_model, run_threads

# Joins and waits that only end a test that would otherwise hang; a passing run never gets near them.
HANG_SECONDS = 120.0
# A context of one KV-cache step (256 tokens) for the stress test.
CONTEXT = 256


def entry(pool: ModelPool, key: str) -> Any:
    return next(e for e in pool.status().entries if e.key == key)


def model_need(path: str, **pool_options: Any) -> int:
    return ModelPool(GIB, **pool_options).estimate(path).needed_bytes


def adapter_need(kit: DemoKit) -> int:
    """Bytes of the largest demo adapter: a budget with this much spare room fits any one of them."""
    return max(
        ModelPool(GIB).estimate(str(kit.model), [str(a)]).adapters_bytes for a in kit.adapters.values()
    )


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(int(HANG_SECONDS * 100)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def start(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result (or exception) lands in the returned one-item list."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def finish(thread: threading.Thread, result: list[Any]) -> Any:
    thread.join(HANG_SECONDS)
    assert not thread.is_alive(), "the thread hung"
    return result[0]


# -- item: a load's recorded size must not shrink when memory is freed at the same time


def test_a_free_during_a_load_does_not_shrink_its_accounting(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second, third = (copy_model(demo_kit, tmp_path / n) for n in ("first", "second", "third"))
    need = model_need(first)
    pool = ModelPool(2 * need + need // 2)  # two models fit, three do not
    pool.load(first)
    real_load = loaders.load_model

    def load_while_another_thread_frees(path: Path, kind: str, adapter: Path | None = None) -> Any:
        loaded = real_load(path, kind, adapter)
        if str(path) == second:
            # Another request's unload lands in the middle of this load, in another thread, for real.
            thread, result = start(lambda: pool.unload(first))
            assert finish(thread, result) is None
        return loaded

    monkeypatch.setattr(loaders, "load_model", load_while_another_thread_frees)
    pool.load(second, pin=True)
    monkeypatch.setattr(loaders, "load_model", real_load)
    loaded = entry(pool, second)
    # The free blurred the active-memory delta, so it is not taken for this model's size.
    assert loaded.accounted_bytes == need and pool.status().used_bytes == need
    pool.load(first, pin=True)
    with pytest.raises(MemoryBudgetError):
        pool.load(third)  # was admitted: the second model counted as 8 bytes plus KV headroom
    assert sorted(e.key for e in pool.status().entries) == sorted([first, second])
    pool.close()


def test_a_load_while_a_lease_runs_is_accounted_at_least_at_its_estimate(
    demo_kit: DemoKit, tmp_path: Path
) -> None:
    other = copy_model(demo_kit, tmp_path / "other")
    pool = ModelPool(GIB)
    with pool.acquire(str(demo_kit.model)):
        # A generation may allocate (or free) meanwhile: the delta is not taken for this model's size.
        pool.load(other)
    loaded = entry(pool, other)
    assert loaded.measured_bytes is None
    assert loaded.accounted_bytes == loaded.estimated_bytes + loaded.kv_bytes
    pool.close()


def test_concurrent_loads_unloads_and_expiries_stay_within_the_budget(
    demo_kit: DemoKit, tmp_path: Path
) -> None:
    """Four requesters, an unloader and a keep-alive timer race under a budget of two models and one adapter.

    A sampler thread reads MLX's process-wide active memory throughout. Besides the pool's entries, MLX holds
    only what this process held before the test (``baseline``: arrays of earlier tests, which can only be
    freed meanwhile) and mx.random's key, made here before the baseline so it is part of it. Wrapping a base
    for an adapter draws its random LoRA init lazily and replaces it before anything evaluates it, and no
    request here runs the model, so no activation or KV cache is live: active memory over
    ``baseline + budget`` is an overrun. A short context keeps the KV headroom (accounted, never allocated
    here) small next to the weights, so a third base resident at once would be over the budget.
    """
    bases = [str(demo_kit.model.resolve())] + [copy_model(demo_kit, tmp_path / f"b{i}") for i in range(2)]
    adapters: list[str | None] = [None, *(str(a) for a in demo_kit.adapters.values())]
    budget = 2 * model_need(bases[0], context_tokens=CONTEXT) + adapter_need(demo_kit) + 1024
    weights = ModelPool(GIB).estimate(bases[0]).weights_bytes
    assert 3 * weights > budget
    pool = ModelPool(budget, keep_alive=0.05, context_tokens=CONTEXT, admission_timeout=HANG_SECONDS)
    mx.eval(mx.random.uniform(shape=(1,)))
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    stop = threading.Event()
    peaks = {"active": 0, "accounted": 0, "samples": 0}

    def sample() -> None:
        while not stop.is_set():
            peaks["active"] = max(peaks["active"], mx.get_active_memory())
            peaks["accounted"] = max(peaks["accounted"], pool.status().used_bytes)
            peaks["samples"] += 1

    def request(seed: int) -> list[str]:
        rng = random.Random(seed)
        done = []
        for _ in range(12):
            base, adapter = rng.choice(bases), rng.choice(adapters)
            with pool.acquire(base, adapter, keep_alive=rng.choice([0, 0.02, None])) as lease:
                assert lease.context_tokens == CONTEXT
                done.append(lease.key)
            del lease  # a lease kept after its block keeps its model alive
        return done

    def unload_some() -> int:
        rng, unloaded = random.Random(99), 0
        while not stop.is_set():
            keys = [e.key for e in pool.status().entries]
            if keys:
                try:
                    pool.unload(rng.choice(keys))
                    unloaded += 1
                except (InUseError, NotFoundError):
                    pass
            stop.wait(0.01)
        return unloaded

    def expire_on_a_timer() -> int:
        expired = 0
        while not stop.is_set():
            expired += len(pool.expire())
            stop.wait(0.005)
        return expired

    helpers = [start(sample), start(unload_some), start(expire_on_a_timer)]
    seeds = iter(range(4))
    results = run_threads(4, lambda: request(next(seeds)))
    stop.set()
    unloaded, expired = (finish(*h) for h in helpers[1:])
    finish(*helpers[0])
    assert all(isinstance(r, list) and len(r) == 12 for r in results), results
    assert peaks["samples"] > 100 and unloaded + expired > 0
    assert peaks["accounted"] <= budget
    assert peaks["active"] <= baseline + budget, (peaks["active"] - baseline, budget)
    status = pool.status()
    assert all(e.in_use == 0 for e in status.entries) and status.waiting == 0
    pool.close()
    gc.collect()
    assert mx.get_active_memory() <= baseline


def test_two_models_loading_at_once_respect_max_models(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one model, a second model's load waits for the first (then evicts it), never overlaps."""
    first, second = (copy_model(demo_kit, tmp_path / n) for n in ("first", "second"))
    pool = ModelPool(GIB, max_models=1, admission_timeout=HANG_SECONDS)
    real_load = loaders.load_model
    most = [0]

    def load_once_the_other_is_admitted_or_waits(path: Path, kind: str, adapter: Path | None = None) -> Any:
        if str(path) == first:
            # The defect admitted the second model while the first still loaded: two reservations at once.
            wait_for(lambda: len(pool._reserved) > 1 or pool.status().waiting == 1, "the second request")
        most[0] = max(most[0], len(pool._reserved) + pool.status().model_count)
        return real_load(path, kind, adapter)

    monkeypatch.setattr(loaders, "load_model", load_once_the_other_is_admitted_or_waits)
    a = start(lambda: pool.load(first))
    wait_for(lambda: bool(pool._reserved), "the first load to be admitted")
    b = start(lambda: pool.load(second))
    results = [finish(*a), finish(*b)]
    assert all(not isinstance(r, BaseException) for r in results), results
    assert most[0] == 1 and [e.key for e in pool.status().entries] == [second]
    pool.close()


# -- item: a request that fits once in-use entries are released waits for them


def one_adapter_budget(kit: DemoKit) -> int:
    """The base and one adapter fit; the base and two do not."""
    return model_need(str(kit.model)) + adapter_need(kit) + 1024


def hold(pool: ModelPool, model: str, adapter: str | None) -> tuple[threading.Event, threading.Event, Any]:
    """Acquire in a thread and keep the lease until ``release`` is set; returns (inside, release, handle)."""
    inside, release = threading.Event(), threading.Event()

    def run() -> str:
        with pool.acquire(model, adapter) as lease:
            inside.set()
            release.wait(HANG_SECONDS)
            return lease.key

    handle = start(run)
    wait_for(lambda: inside.is_set() or bool(handle[1]), "the holder to get its lease")
    return inside, release, handle


def test_a_request_waits_for_in_use_entries_instead_of_failing(demo_kit: DemoKit) -> None:
    pool = ModelPool(one_adapter_budget(demo_kit), admission_timeout=HANG_SECONDS)
    model = str(demo_kit.model)
    colors, numbers = str(demo_kit.adapters["colors"]), str(demo_kit.adapters["numbers"])
    _, release, holder = hold(pool, model, colors)

    def second() -> tuple[str, str]:
        with pool.acquire(model, numbers) as lease:
            return lease.key, entry(pool, lease.base_key).applied_adapter

    waiter = start(second)
    wait_for(lambda: pool.status().waiting == 1, "the second request to wait for memory")
    assert not waiter[1], waiter[1]  # still waiting, not refused
    release.set()
    assert finish(*holder).endswith("colors")
    key, applied = finish(*waiter)
    assert key == applied and key.endswith("numbers")
    assert [e.key.rsplit("/", 1)[-1] for e in pool.status().entries] == ["text-model", "numbers"]
    assert pool.status().waiting == 0
    pool.close()


def test_a_waiting_request_gives_up_after_the_timeout(demo_kit: DemoKit) -> None:
    pool = ModelPool(one_adapter_budget(demo_kit), admission_timeout=0.2)
    model = str(demo_kit.model)
    _, release, holder = hold(pool, model, str(demo_kit.adapters["colors"]))
    with pytest.raises(MemoryBudgetError) as info, pool.acquire(model, str(demo_kit.adapters["numbers"])):
        pass
    assert "waited 0.2 s" in info.value.message and info.value.hint
    release.set()
    finish(*holder)
    status = pool.status()
    assert status.waiting == 0 and all(e.in_use == 0 for e in status.entries)
    assert status.used_bytes == sum(e.accounted_bytes for e in status.entries)
    pool.close()


def test_what_can_never_fit_fails_at_once(demo_kit: DemoKit, tmp_path: Path) -> None:
    """No waiting for what releases cannot help: larger than the limit, pinned entries, its own base."""
    model = str(demo_kit.model)
    colors, numbers = str(demo_kit.adapters["colors"]), str(demo_kit.adapters["numbers"])
    never = HANG_SECONDS * 100  # a wait would hang the test past its join

    def refused(fn: Callable[[], Any]) -> MemoryBudgetError:
        thread, result = start(fn)
        error = finish(thread, result)
        assert isinstance(error, MemoryBudgetError), error
        assert "waited" not in error.message
        return error

    assert (
        "pool limit is 1.0 KiB"
        in refused(lambda: ModelPool(1024, admission_timeout=never).load(model)).message
    )

    pinned = ModelPool(one_adapter_budget(demo_kit), admission_timeout=never)
    pinned.load(model, colors, pin=True)
    refused(lambda: pinned.load(model, numbers))
    pinned.close()

    # The only entry that could make room is the base this very request holds.
    own = ModelPool(model_need(model) + 1024, admission_timeout=never)
    own.load(model)
    refused(lambda: own.load(model, colors))
    own.close()

    one = ModelPool(GIB, max_models=1, admission_timeout=never)
    one.load(model, pin=True)
    assert "at most 1" in refused(lambda: one.load(copy_model(demo_kit, tmp_path / "second"))).message
    one.close()


def test_two_requests_waiting_on_each_other_are_resolved_by_the_timeout(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request holds its base and needs the other's evicted to load its adapter: a cycle of waiters."""
    x, y = str(demo_kit.model.resolve()), copy_model(demo_kit, tmp_path / "y")
    budget = 2 * model_need(x) + 1024  # both bases fit; no adapter fits beside them
    pool = ModelPool(budget, admission_timeout=0.5)
    pool.load(x)
    pool.load(y)
    both_hold_their_base = threading.Barrier(2)
    real_reserve = pool._reserve

    def reserve_then_meet(plan: Any, key: str, *args: Any, **kwargs: Any) -> Any:
        found = real_reserve(plan, key, *args, **kwargs)
        if key in (x, y):
            both_hold_their_base.wait(HANG_SECONDS)
        return found

    monkeypatch.setattr(pool, "_reserve", reserve_then_meet)

    def use(model: str, adapter: str) -> str:
        with pool.acquire(model, adapter) as lease:
            return lease.key

    first = start(lambda: use(x, str(demo_kit.adapters["colors"])))
    second = start(lambda: use(y, str(demo_kit.adapters["numbers"])))
    outcomes = [finish(*first), finish(*second)]
    # The cycle ends when a wait times out and that request lets go of its base; the other may then go on.
    assert any(isinstance(o, MemoryBudgetError) for o in outcomes), outcomes
    assert all(isinstance(o, (str, MemoryBudgetError)) for o in outcomes), outcomes
    status = pool.status()
    assert status.waiting == 0 and all(e.in_use == 0 for e in status.entries)
    assert status.used_bytes == sum(e.accounted_bytes for e in status.entries) <= budget
    pool.close()


# -- item: releasing, expiring or evicting never waits for another request's generation


class WatchedLock:
    """A base's lock that tells who holds it and when ``watched`` (one thread) had to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: threading.Thread | None = None
        self.watched: threading.Thread | None = None
        self.watched_waits = threading.Event()
        self.others_wait = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(False)
        if not got and blocking:
            (self.watched_waits if threading.current_thread() is self.watched else self.others_wait).set()
            got = self._lock.acquire(True, timeout)
        if got:
            self.owner = threading.current_thread()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_a_short_request_with_keep_alive_0_ends_while_a_long_one_runs(
    demo_kit: DemoKit, endless_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A on one adapter ends; B, queued on the same base, takes the lock and generates without end.

    A's release expires its adapter (keep-alive 0), which must come off the base: it must not wait for B's
    generation. The interleaving in which the release used to block until B's generation ended is forced:
    A frees only once B holds the base's lock, and B swaps (then generates) only once A has tried the lock.
    """
    from mlx_lm import stream_generate

    pool = ModelPool(GIB, keep_alive=-1)
    model = str(endless_model.resolve())
    a, b = str(demo_kit.adapters["colors"]), str(demo_kit.adapters["numbers"])
    pool.load(model, b)
    lock = WatchedLock()
    pool._entries[model].lock = lock  # type: ignore[assignment]
    real_swap, real_free = pool._swap_to, pool._free

    def swap_once_a_waits(base: Any, child: Any) -> Any:
        if child is not None and child.key.endswith("numbers"):
            lock.watched_waits.wait(HANG_SECONDS)
        return real_swap(base, child)

    def free_once_b_holds_the_lock(gone: list[Any], *args: Any, **kwargs: Any) -> Any:
        if gone and threading.current_thread() is lock.watched:
            wait_for(lambda: lock.owner not in (None, lock.watched), "B to take the base's lock")
        return real_free(gone, *args, **kwargs)

    monkeypatch.setattr(pool, "_swap_to", swap_once_a_waits)
    monkeypatch.setattr(pool, "_free", free_once_b_holds_the_lock)
    b_tokens, b_stop = [0], threading.Event()

    def long_b() -> str:
        with pool.acquire(model, b) as lease:
            for _ in stream_generate(lease.model, lease.tokenizer, [1, 2, 3], max_tokens=10**7):
                b_tokens[0] += 1
                if b_stop.is_set():
                    return "stopped"
        return "ended on its own"

    def short_a() -> int:
        lock.watched = threading.current_thread()
        with pool.acquire(model, a, keep_alive=0):
            b_thread[0] = start(long_b)
            wait_for(lock.others_wait.is_set, "B to queue on the base's lock")
        return b_tokens[0]

    b_thread: list[Any] = [None]
    a_thread, a_result = start(short_a)
    a_thread.join(HANG_SECONDS)
    finished_while_b_ran = not a_thread.is_alive()
    if finished_while_b_ran:
        wait_for(lambda: b_tokens[0] > a_result[0] + 2, "B to go on generating after A ended")
    b_stop.set()
    assert finished_while_b_ran, "A's release waited for B's generation"
    assert finish(*b_thread[0]) == "stopped"
    keys = [e.key.rsplit("/", 1)[-1] for e in pool.status().entries]
    assert keys == ["model", "numbers"]  # A expired; B's adapter applied
    assert entry(pool, model).applied_adapter.endswith("numbers")
    pool.close()
