"""2. MLX active memory for 1, 2, 4, 8 adapters on one base in the pool vs one full model per combination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Settings, measured_active, ratio, say
from benchmarks.models import adapter_file_bytes, adapters_for, build_model, weights_bytes

COUNTS = (1, 2, 4, 8)


def pool_bytes(model: Path, adapters: list[Path]) -> int:
    """Active memory of a pool holding the base and every adapter, one of them applied."""
    from mlxman.pool import ModelPool

    with measured_active() as reading:
        pool = ModelPool(64 * GIB, keep_alive=-1)
        for adapter in adapters:
            pool.load(str(model), str(adapter))
        with pool.acquire(str(model), str(adapters[-1])):
            pass
        from benchmarks.common import active_bytes, settle

        settle()
        held = active_bytes() - reading["before"]
        pool.close()
    return held


def copies_bytes(model: Path, adapters: list[Path]) -> int:
    """Active memory of what a copy-per-combination pool holds: one full mlx_lm.load per adapter."""
    import mlx.core as mx
    from mlx_lm import load

    from benchmarks.common import active_bytes, settle

    with measured_active() as reading:
        held_models: list[Any] = [load(str(model), adapter_path=str(a)) for a in adapters]
        # mlx-lm reads adapter tensors lazily; a model that has generated once holds them, so count them.
        mx.eval([loaded[0].parameters() for loaded in held_models])
        settle()
        held = active_bytes() - reading["before"]
        del held_models
    return held


def run(settings: Settings) -> dict[str, Any]:
    root = settings.work / "models"
    # A middle size: 8 real copies of it must fit in memory next to everything else.
    spec = settings.sizes[1]
    model = build_model(root, spec, "float16")
    adapters = adapters_for(root, model, max(COUNTS))
    base = weights_bytes(model)
    rows = []
    for n in COUNTS:
        chosen = adapters[:n]
        own = base + sum(adapter_file_bytes(a) for a in chosen)
        pooled = pool_bytes(model, chosen)
        copies = copies_bytes(model, chosen)
        row = {
            "adapters": n,
            "base_bytes": base,
            "base_plus_adapters_bytes": own,
            "pool_bytes": pooled,
            "copies_bytes": copies,
            "pool_vs_own": ratio(pooled, own),
            "copies_vs_pool": ratio(copies, pooled),
        }
        rows.append(row)
        say(
            f"  memory {n} adapter(s) on {model.name}: pool {pooled / 2**20:7.1f} MiB "
            f"({row['pool_vs_own']:.3f}x base+adapters), copies {copies / 2**20:7.1f} MiB "
            f"({row['copies_vs_pool']:.2f}x the pool)"
        )
    return {"model": model.name, "rows": rows}
