"""The model pool: memory admission, eviction, pinning, keep-alive and adapter hot-swap on resident bases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlxman.pool.policy import parse_keep_alive
    from mlxman.pool.pool import ModelPool
    from mlxman.pool.views import EntryStatus, Estimate, Hold, Lease, PoolStatus

__all__ = ["EntryStatus", "Estimate", "Hold", "Lease", "ModelPool", "PoolStatus", "parse_keep_alive"]

# Imported on first use: `mlxman ls` reads pool.estimate and pool.kinds without loading the pool (and MLX).
_HOME = {
    "parse_keep_alive": "policy",
    "ModelPool": "pool",
    **dict.fromkeys(("EntryStatus", "Estimate", "Hold", "Lease", "PoolStatus"), "views"),
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
