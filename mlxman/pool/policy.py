"""Pool policy, pure: keep-alive parsing, admission with victim choice, and expiry, on plain numbers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from mlxman.errors import UsageError

KEEP_ALIVE_HINT = (
    "use seconds or a duration such as 30s, 5m, 1h30m; 0 unloads after use, a negative value never"
)
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: str | float | int) -> float:
    """Ollama-style keep-alive in seconds: ``"5m"``, ``"1h30m"``, ``300``; 0: unload after use, <0: never."""
    if isinstance(value, bool):
        raise UsageError(f"Invalid keep-alive {value!r}", KEEP_ALIVE_HINT)
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION_RE.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise UsageError(f"Invalid keep-alive {value!r}", KEEP_ALIVE_HINT) from None
            seconds = sign * sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds):
        raise UsageError(f"Invalid keep-alive {value!r}", KEEP_ALIVE_HINT)
    return -1.0 if seconds < 0 else seconds


def expires_at(last_used: float, keep_alive: float) -> float | None:
    """When an idle entry expires; None means never."""
    return None if keep_alive < 0 else last_used + keep_alive


@dataclass(frozen=True)
class EntryView:
    """What policy needs to know of a resident entry. ``parent`` is the base key of an adapter entry."""

    key: str
    nbytes: int
    last_used: float
    parent: str | None = None
    pinned: bool = False
    in_use: int = 0
    keep_alive: float = -1.0

    @property
    def idle(self) -> bool:
        return self.in_use == 0 and not self.pinned


@dataclass(frozen=True)
class Unit:
    """What one eviction removes: an adapter entry alone, or a base with all its adapter entries."""

    key: str
    keys: tuple[str, ...]
    nbytes: int
    last_used: float
    is_model: bool


@dataclass(frozen=True)
class Admission:
    """The verdict on one load: ``victims`` (unit keys, oldest first) are unloaded before it when it fits."""

    fits: bool
    needed: int
    limit: int
    in_use: int
    available: int
    to_free: int
    victims: list[str] = field(default_factory=list)
    freed: int = 0
    evictable: list[str] = field(default_factory=list)
    evictable_bytes: int = 0
    models_to_free: int = 0
    reason: str = ""


def evictable_units(entries: list[EntryView]) -> list[Unit]:
    """Units that may go, least recently used first. A base goes with its adapters, so only if they can."""
    children: dict[str, list[EntryView]] = {}
    for e in entries:
        if e.parent is not None:
            children.setdefault(e.parent, []).append(e)
    units: list[Unit] = []
    for e in entries:
        if not e.idle:
            continue
        if e.parent is not None:
            units.append(Unit(e.key, (e.key,), e.nbytes, e.last_used, is_model=False))
            continue
        kids = children.get(e.key, [])
        if all(k.idle for k in kids):
            units.append(
                Unit(
                    e.key,
                    (*(k.key for k in kids), e.key),
                    e.nbytes + sum(k.nbytes for k in kids),
                    max([e.last_used, *(k.last_used for k in kids)]),
                    is_model=True,
                )
            )
    # On equal recency an adapter goes before a base: it frees less and keeps the base for others.
    return sorted(units, key=lambda u: (u.last_used, u.is_model, u.key))


def _covered(chosen: list[Unit]) -> set[str]:
    return {k for u in chosen for k in u.keys}


def admit(
    entries: list[EntryView],
    needed: int,
    limit: int,
    available: int,
    *,
    max_models: int,
    adds_model: bool,
    reserved: int = 0,
    reserved_models: int = 0,
) -> Admission:
    """Decide whether ``needed`` more bytes fit, and which least-recently-used idle entries to evict for them.

    Victims are taken oldest first until the shortfall (against the pool limit and the machine's available
    memory) and the model-count limit are met; then every victim not needed to meet them is spared, newest
    first, so the victim set frees no more than needed. ``reserved`` bytes and ``reserved_models`` models are
    loads in flight: they count as used.
    """
    in_use = sum(e.nbytes for e in entries) + reserved
    to_free = max(in_use + needed - limit, needed - available, 0)
    models = sum(1 for e in entries if e.parent is None) + reserved_models
    models_to_free = max(models + 1 - max_models, 0) if adds_model else 0
    units = evictable_units(entries)
    base = Admission(
        fits=False,
        needed=needed,
        limit=limit,
        in_use=in_use,
        available=available,
        to_free=to_free,
        evictable=[u.key for u in units],
        evictable_bytes=sum(e.nbytes for e in entries if e.key in _covered(units)),
        models_to_free=models_to_free,
    )
    if needed > limit:
        return replace(base, reason="larger than the pool limit")
    if to_free == 0 and models_to_free == 0:
        return replace(base, fits=True)

    chosen: list[Unit] = []
    for unit in units:
        freed = sum(u.nbytes for u in chosen)
        model_count = sum(1 for u in chosen if u.is_model)
        if freed >= to_free and model_count >= models_to_free:
            break
        if unit.key in _covered(chosen):
            continue
        if not unit.is_model and model_count < models_to_free and freed >= to_free:
            continue
        # A base absorbs its adapter entries chosen before it.
        chosen = [u for u in chosen if not set(u.keys) <= set(unit.keys)]
        chosen.append(unit)

    def enough(units_: list[Unit]) -> bool:
        return (
            sum(u.nbytes for u in units_) >= to_free
            and sum(1 for u in units_ if u.is_model) >= models_to_free
        )

    if not enough(chosen):
        reason = (
            "too many models"
            if sum(1 for u in chosen if u.is_model) < models_to_free
            else "not enough memory"
        )
        return replace(base, reason=reason)
    for unit in sorted(chosen, key=lambda u: (u.last_used, u.key), reverse=True):
        rest = [u for u in chosen if u is not unit]
        if enough(rest):
            chosen = rest
    chosen.sort(key=lambda u: (u.last_used, u.key))
    return replace(base, fits=True, victims=[u.key for u in chosen], freed=sum(u.nbytes for u in chosen))


def expired(entries: list[EntryView], now: float) -> list[str]:
    """Idle entries past their keep-alive, adapters first; a base stays while any of its adapters stays."""
    gone: set[str] = set()
    for e in entries:
        deadline = expires_at(e.last_used, e.keep_alive)
        if e.parent is not None and e.idle and deadline is not None and now >= deadline:
            gone.add(e.key)
    children: dict[str, list[str]] = {}
    for e in entries:
        if e.parent is not None:
            children.setdefault(e.parent, []).append(e.key)
    out = [e.key for e in entries if e.key in gone]
    for e in entries:
        deadline = expires_at(e.last_used, e.keep_alive)
        if (
            e.parent is None
            and e.idle
            and deadline is not None
            and now >= deadline
            and all(k in gone for k in children.get(e.key, []))
        ):
            out.append(e.key)
    return out
