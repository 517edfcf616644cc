"""The model pool: memory admission, eviction, pinning, keep-alive and adapter hot-swap on resident bases."""

from mlxman.pool.policy import parse_keep_alive
from mlxman.pool.pool import ModelPool
from mlxman.pool.views import EntryStatus, Estimate, Hold, Lease, PoolStatus

__all__ = ["EntryStatus", "Estimate", "Hold", "Lease", "ModelPool", "PoolStatus", "parse_keep_alive"]
