"""1. Adapter switch on a resident base (pool.acquire) vs a fresh ``mlx_lm.load(base, adapter_path=...)``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Settings, median, ratio, say, settle
from benchmarks.models import build_model, synthesize_adapter, weights_bytes


def fresh_load_seconds(model: Path, adapter: Path, repeats: int) -> float:
    import mlx.core as mx
    from mlx_lm import load

    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = load(str(model), adapter_path=str(adapter))
        # mlx-lm reads the adapter's tensors lazily: the first token would wait for them, so they count.
        mx.eval(loaded[0].parameters())
        samples.append(time.perf_counter() - start)
        del loaded
        settle()
    return median(samples)


def switch_seconds(model: Path, a: Path, b: Path, repeats: int) -> dict[str, Any]:
    """Median time to get a lease on the other adapter, a -> b -> a ..., both adapters already resident.

    Timed from the call to ``acquire`` until the ``with`` block is entered: everything a caller waits for
    (key resolution, locks, the swap itself), not only the pool's own ``swap_seconds``.
    """
    from mlxman.pool import ModelPool

    walls, swaps, modes = [], [], set()
    with ModelPool(64 * GIB, keep_alive=-1) as pool:
        pool.load(str(model), str(a))
        pool.load(str(model), str(b))
        with pool.acquire(str(model), str(a)):
            pass
        for i in range(repeats * 2):
            lease_cm = pool.acquire(str(model), str(b if i % 2 == 0 else a))
            start = time.perf_counter()
            lease = lease_cm.__enter__()
            walls.append(time.perf_counter() - start)
            swaps.append(lease.swap_seconds)
            modes.add(lease.swap_mode)
            lease_cm.__exit__(None, None, None)
            del lease
    settle()
    return {"acquire_s": median(walls), "swap_s": median(swaps), "mode": "/".join(sorted(modes))}


def run(settings: Settings) -> dict[str, Any]:
    root = settings.work / "models"
    sizes = settings.sizes
    cases = [(spec, "float16") for spec in sizes] + [(sizes[-1], "q4")]
    rows = []
    for spec, dtype in cases:
        model = build_model(root, spec, dtype)
        a = synthesize_adapter(model, root / f"{model.name}-lora0", seed=100)
        b = synthesize_adapter(model, root / f"{model.name}-lora1", seed=101)
        load_s = fresh_load_seconds(model, a, settings.repeats)
        sw = switch_seconds(model, a, b, settings.repeats)
        row = {
            "model": model.name,
            "dtype": dtype,
            "base_bytes": weights_bytes(model),
            "adapter_bytes": _adapter_bytes(a),
            "fresh_load_s": load_s,
            **sw,
            "ratio": ratio(load_s, sw["acquire_s"]),
        }
        rows.append(row)
        say(
            f"  switch {model.name:12s} base {row['base_bytes'] / 2**20:7.1f} MiB: fresh load "
            f"{load_s * 1000:8.2f} ms, switch {sw['acquire_s'] * 1000:6.2f} ms ({sw['mode']}) "
            f"-> {row['ratio']:.1f}x"
        )
    # The pool engineer's layout cases, on the largest fp16 base: a rank change and LoRA <-> DoRA.
    big = build_model(root, sizes[-1], "float16")
    a = synthesize_adapter(big, root / f"{big.name}-lora0", seed=100)
    others = {
        "another rank (LoRA r8 <-> r16)": synthesize_adapter(
            big, root / f"{big.name}-lora-r16", rank=16, seed=7
        ),
        "LoRA <-> DoRA": synthesize_adapter(big, root / f"{big.name}-dora", seed=8, fine_tune_type="dora"),
    }
    layouts = []
    for label, other in others.items():
        sw = switch_seconds(big, a, other, settings.repeats)
        layouts.append({"case": label, "model": big.name, **sw})
        say(f"  switch {big.name}, {label}: {sw['acquire_s'] * 1000:.2f} ms ({sw['mode']})")
    return {"rows": rows, "layouts": layouts}


def _adapter_bytes(adapter: Path) -> int:
    from benchmarks.models import adapter_file_bytes

    return adapter_file_bytes(adapter)
