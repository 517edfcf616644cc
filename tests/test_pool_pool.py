"""The pool with real demo models: admission, eviction, pinning, keep-alive, single-flight, freeing."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import threading
from collections import namedtuple
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlxman.demo import DemoKit
from mlxman.errors import AdapterError, InUseError, MemoryBudgetError, ModelError, NotFoundError, UsageError
from mlxman.memory import format_bytes
from mlxman.pool import ModelPool, loaders
from mlxman.pool.estimate import model_context
from mlxman.pool.keys import resolve_target
from mlxman.pool.kinds import EMBEDDINGS, TEXT, VISION, detect_kind, resolve_kind

GIB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def copy_model(kit: DemoKit, dst: Path) -> str:
    """A second (distinct) base: the demo model under another path."""
    shutil.copytree(kit.model, dst)
    return str(dst.resolve())


def one_model_budget(kit: DemoKit) -> int:
    """Room for one demo model (weights + KV headroom) and its adapters, not for two."""
    need = ModelPool(GIB).estimate(str(kit.model)).needed_bytes
    return need + need // 2


def keys(pool: ModelPool) -> list[str]:
    return [e.key for e in pool.status().entries]


def test_estimate_equals_measured_weights(demo_kit: DemoKit) -> None:
    # Active memory is process-wide: run in a fresh interpreter so no other test's arrays blur the delta.
    code = f"""
import json
from mlxman.pool import ModelPool
pool = ModelPool({GIB})
est = pool.estimate({str(demo_kit.model)!r}, [{str(demo_kit.adapters["colors"])!r}])
pool.load({str(demo_kit.model)!r}, {str(demo_kit.adapters["colors"])!r})
base, child = pool.status().entries
print(json.dumps(dict(est=[est.fits, est.would_evict, est.kv_bytes, est.weights_bytes, est.adapters_bytes],
    base=[base.measured_bytes, base.estimated_bytes, base.kv_bytes, base.key, base.adapters],
    child=[child.measured_bytes, child.estimated_bytes, child.parent, child.key])))
pool.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    fits, would_evict, kv, weights, adapters = data["est"]
    b_measured, b_estimated, b_kv, b_key, b_adapters = data["base"]
    c_measured, c_estimated, c_parent, c_key = data["child"]
    assert fits and would_evict == [] and kv > 0
    assert b_measured == b_estimated == weights
    assert c_measured == c_estimated == adapters
    assert c_parent == b_key and b_adapters == [c_key]
    assert b_kv == kv


def test_keys_are_canonical(demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo_kit.adapters["colors"].parent)
    a = resolve_target(str(demo_kit.model), "./colors")
    b = resolve_target(f"{demo_kit.model}::{demo_kit.adapters['colors'].resolve()}")
    assert a.key == b.key == f"{demo_kit.model.resolve()}::{demo_kit.adapters['colors'].resolve()}"
    pool = ModelPool(GIB)
    pool.load(str(demo_kit.model), "./colors")
    pool.load(a.key)
    assert len(pool.status().entries) == 2
    pool.unload(a.key)
    assert keys(pool) == [a.base_key]
    pool.close()


def test_memory_returns_after_unload(demo_kit: DemoKit) -> None:
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    pool = ModelPool(GIB)
    for name in ("colors", "animals"):
        with pool.acquire(str(demo_kit.model), str(demo_kit.adapters[name])) as lease:
            mx.eval(lease.model(mx.array([[1, 2, 3]])))
        del lease
    assert mx.get_active_memory() > baseline
    pool.unload(str(demo_kit.model))
    assert pool.status().entries == []
    assert mx.get_active_memory() == baseline
    assert mx.get_cache_memory() == 0


def test_lru_eviction_and_estimate_only(demo_kit: DemoKit, tmp_path: Path) -> None:
    clock = Clock()
    pool = ModelPool(one_model_budget(demo_kit), clock=clock)
    first = str(demo_kit.model.resolve())
    second = copy_model(demo_kit, tmp_path / "second")
    pool.load(first, str(demo_kit.adapters["colors"]))
    clock.advance(1)
    est = pool.estimate(second)
    assert est.fits and est.would_evict == [first]
    assert keys(pool) == [first, f"{first}::{demo_kit.adapters['colors'].resolve()}"]
    pool.load(second)
    assert keys(pool) == [second]


def test_pinned_and_in_use_entries_are_not_evicted(demo_kit: DemoKit, tmp_path: Path) -> None:
    budget = one_model_budget(demo_kit)
    pool = ModelPool(budget)
    first = str(demo_kit.model.resolve())
    second = copy_model(demo_kit, tmp_path / "second")
    pool.load(first, pin=True)
    with pytest.raises(MemoryBudgetError) as info:
        pool.load(second)
    need = pool.estimate(second).needed_bytes
    message = info.value.message
    assert f"needs {format_bytes(need)}" in message
    assert f"pool limit is {format_bytes(budget)}" in message
    in_use = pool.status().used_bytes
    assert f"{format_bytes(in_use)} in use" in message
    assert "every entry is pinned or in use" in message and info.value.hint
    assert keys(pool) == [first]
    pool.unpin(first)
    with pool.acquire(first), pytest.raises(MemoryBudgetError):
        pool.load(second)
    pool.load(second)
    assert keys(pool) == [second]
    pool.close()


def test_refuses_a_model_larger_than_the_limit(demo_kit: DemoKit) -> None:
    pool = ModelPool(1024)
    with pytest.raises(MemoryBudgetError) as info:
        pool.load(str(demo_kit.model))
    assert "pool limit is 1.0 KiB" in info.value.message
    assert pool.status().entries == []


def test_low_memory_machine(demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    real = psutil.virtual_memory()
    fake = namedtuple("fake", ["total", "available"])(real.total, 64 * 1024)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)
    pool = ModelPool(8 * GIB)
    assert not pool.estimate(str(demo_kit.model)).fits
    with pytest.raises(MemoryBudgetError) as info:
        pool.load(str(demo_kit.model))
    assert "64.0 KiB available on this machine" in info.value.message
    assert pool.status().entries == []


def test_max_models(demo_kit: DemoKit, tmp_path: Path) -> None:
    clock = Clock()
    pool = ModelPool(GIB, max_models=1, clock=clock)
    first = str(demo_kit.model.resolve())
    second = copy_model(demo_kit, tmp_path / "second")
    pool.load(first, str(demo_kit.adapters["numbers"]))
    clock.advance(1)
    pool.load(second)
    assert keys(pool) == [second]
    pool.pin(second)
    with pytest.raises(MemoryBudgetError) as info:
        pool.load(first)
    assert "at most 1" in info.value.message
    pool.close()


def test_keep_alive_expiry_with_injected_clock(demo_kit: DemoKit) -> None:
    clock = Clock()
    pool = ModelPool(GIB, keep_alive=60, clock=clock)
    base = str(demo_kit.model.resolve())
    colors = f"{base}::{demo_kit.adapters['colors'].resolve()}"
    with pool.acquire(base, str(demo_kit.adapters["colors"])):
        clock.advance(1000)  # time in use does not count
        assert pool.expire() == []
    status = {e.key: e for e in pool.status().entries}
    assert status[colors].expires_at == clock.now + 60 and status[colors].expires_in == 60
    clock.advance(59)
    assert pool.expire() == []
    clock.advance(2)
    assert pool.expire() == [colors, base]
    assert pool.status().entries == []

    # 0: unloaded right after use; negative: never.
    with pool.acquire(base, keep_alive=0):
        assert keys(pool) == [base]
    assert keys(pool) == []
    pool.load(base, keep_alive=-1)
    clock.advance(10**9)
    assert pool.expire() == [] and keys(pool) == [base]
    # A per-call keep-alive replaces the entry's.
    with pool.acquire(base, keep_alive=5):
        pass
    clock.advance(5)
    assert pool.expire() == [base]


def test_pinned_entries_do_not_expire(demo_kit: DemoKit) -> None:
    clock = Clock()
    pool = ModelPool(GIB, keep_alive=1, clock=clock)
    pool.load(str(demo_kit.model), str(demo_kit.adapters["colors"]), pin=True)
    clock.advance(100)
    assert pool.expire() == []
    assert len(keys(pool)) == 2
    pool.close()
    assert keys(pool) == []


def test_unload_errors(demo_kit: DemoKit) -> None:
    pool = ModelPool(GIB)
    with pytest.raises(NotFoundError) as info:
        pool.unload("nothing-here")
    assert "not loaded" in info.value.message
    with pool.acquire(str(demo_kit.model)), pytest.raises(InUseError) as busy:
        pool.unload(str(demo_kit.model))
    assert "in use" in busy.value.message and busy.value.hint
    assert len(pool.status().entries) == 1
    pool.close()


def test_context_sets_the_kv_headroom_and_the_lease_bound(demo_kit: DemoKit) -> None:
    model, colors = str(demo_kit.model), str(demo_kit.adapters["colors"])
    per_token = ModelPool(GIB, context_tokens=256).estimate(model).kv_bytes // 256
    assert per_token > 0
    pool = ModelPool(GIB, context_tokens=1000)
    assert pool.estimate(model).kv_bytes == per_token * 1024  # mlx-lm's cache grows in 256-token steps
    with pool.acquire(model, colors) as lease:
        assert lease.context_tokens == 1000
    (base, child) = pool.status().entries
    assert (base.context_tokens, child.context_tokens) == (1000, 1000)
    assert base.kv_bytes == per_token * 1024 and child.kv_bytes == 0
    pool.close()
    # The demo model declares 2,048 positions: a larger context is capped there, as Ollama caps num_ctx.
    wide = ModelPool(GIB, context_tokens=32768)
    assert wide.estimate(model).kv_bytes == per_token * 2048
    with wide.acquire(model) as lease:
        assert lease.context_tokens == 2048
    wide.close()


def test_model_context_follows_the_config() -> None:
    assert model_context({}, 4096) == 4096
    assert model_context({"max_position_embeddings": 2048}, 4096) == 2048
    assert model_context({"max_position_embeddings": 131072}, 4096) == 4096
    assert model_context({"n_positions": 1024, "max_position_embeddings": True}, 4096) == 1024
    assert model_context({"text_config": {"max_position_embeddings": 512}}, 4096) == 512
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert model_context({"max_position_embeddings": 32768, "rope_scaling": yarn}, 10**6) == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert model_context({"max_position_embeddings": 131072, "rope_scaling": llama3}, 10**6) == 131072
    linear = {"type": "linear", "factor": 2}
    assert model_context({"max_position_embeddings": 2048, "rope_scaling": linear}, 10**6) == 4096


def test_estimate_of_resident_entries_shows_their_size(demo_kit: DemoKit) -> None:
    model, colors = str(demo_kit.model), str(demo_kit.adapters["colors"])
    pool = ModelPool(GIB)
    before = pool.estimate(model, [colors])
    pool.load(model, colors)
    after = pool.estimate(model, [colors])
    assert (after.weights_bytes, after.adapters_bytes, after.kv_bytes) == (
        before.weights_bytes,
        before.adapters_bytes,
        before.kv_bytes,
    )
    assert after.resident_bytes == pool.status().used_bytes and after.needed_bytes == 0
    assert sorted(after.resident) == sorted(e.key for e in pool.status().entries)
    assert before.resident_bytes == 0 and before.needed_bytes == after.resident_bytes
    pool.close()


def test_a_load_measured_over_its_estimate_evicts_until_within_budget(
    demo_kit: DemoKit, tmp_path: Path
) -> None:
    """Arrays a model makes at init are not in its files (llama3 RoPE keeps its frequencies): it is bigger."""
    plain = copy_model(demo_kit, tmp_path / "plain")
    roped = copy_model(demo_kit, tmp_path / "roped")
    config = json.loads((Path(roped) / "config.json").read_text())
    config["max_position_embeddings"] = 131072
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (Path(roped) / "config.json").write_text(json.dumps(config))
    budget = ModelPool(GIB).estimate(plain).needed_bytes + ModelPool(GIB).estimate(roped).needed_bytes
    pool = ModelPool(budget)
    pool.load(plain)
    pool.load(roped)  # fits by its estimate
    loaded = next(e for e in pool.status().entries if e.key == roped)
    assert loaded.measured_bytes is not None and loaded.measured_bytes > loaded.estimated_bytes
    assert loaded.accounted_bytes == loaded.measured_bytes + loaded.kv_bytes
    # The pool went over by what the estimate missed, so it evicted the idle model to be within budget again.
    assert keys(pool) == [roped] and pool.status().used_bytes <= budget
    pool.close()


def test_adapter_validation_is_never_skipped(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An adapter missing block 1 loads silently in mlx-lm; only validation stops it, and it always runs."""
    partial = tmp_path / "partial"
    shutil.copytree(demo_kit.adapters["colors"], partial)
    weights = mx.load(str(partial / "adapters.safetensors"))
    mx.save_safetensors(
        str(partial / "adapters.safetensors"), {k: v for k, v in weights.items() if ".layers.1." not in k}
    )
    monkeypatch.setitem(sys.modules, "mlxman.adapters.validate", None)  # any import of it now fails
    pool = ModelPool(GIB)
    with pytest.raises(AdapterError) as info:
        pool.load(str(demo_kit.model), str(partial))
    assert "block 1 has no tensors" in info.value.message
    assert pool.status().entries == []  # checked before the base is even loaded
    pool.close()


def spy_loads(monkeypatch: pytest.MonkeyPatch, pool: ModelPool, waiters: int) -> list[str]:
    """Count real loads; the first holds until every other thread waits on it, so all 8 overlap."""
    calls: list[str] = []
    real = loaders.load_model

    def counting(path: Path, kind: str, adapter: Path | None = None) -> Any:
        calls.append(str(path))
        flights = pool._flights  # only to know the other threads are waiting
        deadline = threading.Event()
        for _ in range(500):
            if any(f.waiters >= waiters for f in flights.values()):
                break
            deadline.wait(0.01)
        return real(path, kind, adapter)

    monkeypatch.setattr(loaders, "load_model", counting)
    return calls


def run_threads(n: int, fn: Any) -> list[Any]:
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_single_flight_load(demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch) -> None:
    pool = ModelPool(GIB)
    calls = spy_loads(monkeypatch, pool, 7)

    def use() -> tuple[str, bool]:
        with pool.acquire(str(demo_kit.model), str(demo_kit.adapters["colors"])) as lease:
            return lease.key, lease.base_was_resident

    results = run_threads(8, use)
    assert len(calls) == 1
    assert all(isinstance(r, tuple) for r in results), results
    assert len({r[0] for r in results}) == 1
    assert sum(1 for r in results if not r[1]) >= 1
    assert len(pool.status().entries) == 2 and all(e.in_use == 0 for e in pool.status().entries)
    pool.close()


def test_single_flight_failure_reaches_every_waiter(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(demo_kit.model, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (broken / "config.json").write_text(json.dumps(config))
    pool = ModelPool(GIB)
    calls = spy_loads(monkeypatch, pool, 7)
    results = run_threads(8, lambda: pool.load(str(broken)))
    assert len(calls) == 1
    assert all(isinstance(r, ModelError) for r in results), results
    assert len({id(r) for r in results}) == 1
    assert "no_such_architecture" in results[0].message
    status = pool.status()
    assert status.entries == [] and status.used_bytes == 0
    assert pool._flights == {}


def test_one_lock_per_base(demo_kit: DemoKit) -> None:
    pool = ModelPool(GIB)
    pool.load(str(demo_kit.model), str(demo_kit.adapters["numbers"]))
    inside = threading.Event()
    release = threading.Event()
    entered_second = threading.Event()

    def first() -> None:
        with pool.acquire(str(demo_kit.model), str(demo_kit.adapters["colors"])):
            inside.set()
            release.wait(30)

    def second() -> None:
        with pool.acquire(str(demo_kit.model), str(demo_kit.adapters["numbers"])):
            entered_second.set()

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(30)
    t2 = threading.Thread(target=second)
    t2.start()
    # While the first lease runs, the second waits: no swap under a running generation.
    assert not entered_second.wait(0.3)
    applied = {e.key: e.applied_adapter for e in pool.status().entries}
    assert applied[str(demo_kit.model.resolve())].endswith("colors")
    release.set()
    t1.join()
    t2.join()
    assert entered_second.is_set()
    pool.close()


def test_embeddings_models_refuse_adapters(demo_kit: DemoKit) -> None:
    if not (demo_kit.embeddings_model / "config.json").is_file():
        pytest.skip("the demo kit was built without its embeddings model")
    pool = ModelPool(GIB)
    with (
        pytest.raises(AdapterError) as info,
        pool.acquire(str(demo_kit.embeddings_model), str(demo_kit.adapters["colors"])),
    ):
        pass
    assert "embeddings" in info.value.message and pool.status().entries == []
    with pool.acquire(str(demo_kit.embeddings_model)) as lease:
        assert lease.kind == EMBEDDINGS
    pool.close()


def write_config(path: Path, config: dict[str, Any], *files: str) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name in files:
        target = path / name
        if name.endswith("/"):
            target.mkdir()
        else:
            target.write_text("{}")
    return path


def test_kind_detection(tmp_path: Path) -> None:
    cases = [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, (), TEXT),
        ({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, (), TEXT),
        ({"model_type": "qwen3"}, ("modules.json",), EMBEDDINGS),
        ({"model_type": "qwen3"}, ("1_Pooling/",), EMBEDDINGS),
        ({"model_type": "bert", "architectures": ["BertModel"]}, (), EMBEDDINGS),
        ({"model_type": "xyz", "architectures": ["XyzForMaskedLM"]}, (), EMBEDDINGS),
        ({"model_type": "llava", "vision_config": {}}, (), VISION),
        ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, (), VISION),
        ({"model_type": "qwen2_vl"}, ("preprocessor_config.json",), VISION),
    ]
    for i, (config, files, kind) in enumerate(cases):
        path = write_config(tmp_path / str(i), config, *files)
        assert detect_kind(path, config) == kind, config
    path = tmp_path / "0"
    assert resolve_kind(path, {}, "vision") == VISION
    with pytest.raises(UsageError):
        resolve_kind(path, {}, "audio")


def test_kind_detection_imports_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from mlxman.pool.kinds import detect_kind; "
        "import mlxman.pool.estimate, mlxman.pool.policy, mlxman.pool.pool; "
        "print([m for m in ('mlx_lm', 'mlx_vlm', 'mlx_embeddings', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
