"""What the pool hands out and reports: leases and holds on models, entry and pool status, estimates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxman.pool.swap import AdapterWeights
from mlxman.settings import DEFAULT_ADMISSION_TIMEOUT


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
    # Tokens (prompt plus generated) the pool admitted KV-cache room for: a generation must stay within it.
    context_tokens: int


@dataclass(frozen=True)
class Hold:
    """A model (and adapter entry) held in use without the base's lock: for the engine, which runs the base
    itself and wears adapters per row. Nothing is swapped; call ``release`` once when the request ends."""

    key: str
    base_key: str
    kind: str
    model: Any
    tokenizer: Any
    adapter: AdapterWeights | None
    context_tokens: int
    kv_bytes_per_token: int
    release: Callable[[], None]
    base_was_resident: bool = True
    load_seconds: float = 0.0


# Called with (key, parent key, adapter weights) for each entry about to be freed, before its memory goes.
FreeWatcher = Callable[[str, str | None, AdapterWeights | None], None]


@dataclass(frozen=True)
class EntryStatus:
    key: str
    kind: str
    parent: str | None
    estimated_bytes: int
    measured_bytes: int | None
    kv_bytes: int
    context_tokens: int
    adapters: list[str]
    applied_adapter: str | None
    pinned: bool
    in_use: int
    last_used: float
    keep_alive: float
    expires_at: float | None
    expires_in: float | None
    # A base served by the engine: its adapter slots, and the KV of the batch running now.
    slot_bytes: int = 0
    batch_kv_bytes: int = 0

    @property
    def accounted_bytes(self) -> int:
        """What the pool counts against its budget: the larger of estimated and measured weights, the
        adapter slots, and KV (one context's, or the batch's when it needs more)."""
        weights = max(self.estimated_bytes, self.measured_bytes or 0)
        return weights + self.slot_bytes + max(self.kv_bytes, self.batch_kv_bytes)

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
    # Requests waiting for requests in flight to release memory, and how long each may wait.
    waiting: int = 0
    admission_timeout: float = DEFAULT_ADMISSION_TIMEOUT

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
    """Would a load fit, what it takes, and what would be evicted for it; nothing is loaded to answer.

    Sizes are whole (what is resident counted at what the pool accounts for it); ``needed_bytes`` is what
    is not resident yet.
    """

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
    resident_bytes: int = 0
    context_tokens: int = 0

    @property
    def needed_bytes(self) -> int:
        return self.weights_bytes + self.adapters_bytes + self.kv_bytes - self.resident_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "needed_bytes": self.needed_bytes}
