"""4. Estimate before load (``ModelPool.estimate``, headers only) vs MLX active memory after the load."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import GIB, Settings, measured_active, ratio, say
from benchmarks.models import DTYPES, build_model


def run(settings: Settings) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load

    from mlxman.pool import ModelPool

    root = settings.work / "models"
    cases = [(spec, dtype) for spec in settings.sizes for dtype in DTYPES]
    cases.append((settings.sizes[0], "float32"))
    rows = []
    pool = ModelPool(64 * GIB, keep_alive=-1)
    for spec, dtype in cases:
        model = build_model(root, spec, dtype)
        start = time.perf_counter()
        estimate = pool.estimate(str(model))
        estimate_s = time.perf_counter() - start
        with measured_active() as reading:
            loaded: Any = load(str(model))
            mx.eval(loaded[0].parameters())
            from benchmarks.common import active_bytes, settle

            settle()
            measured = active_bytes() - reading["before"]
            del loaded
        row = {
            "model": model.name,
            "dtype": dtype,
            "estimated_bytes": estimate.weights_bytes,
            "kv_headroom_bytes": estimate.kv_bytes,
            "measured_bytes": measured,
            "estimate_seconds": estimate_s,
            "ratio": ratio(estimate.weights_bytes, measured),
        }
        rows.append(row)
        say(
            f"  estimate {model.name:12s}: estimated {estimate.weights_bytes:>11,d} B, measured "
            f"{measured:>11,d} B -> {row['ratio']:.6f}x (in {estimate_s * 1000:.1f} ms)"
        )
    pool.close()
    return {"rows": rows}
