"""What ``/v1/models`` lists: every id this server would serve now, loaded or not, from files' JSON alone.

That is the pool's entries, the names of ``mlxman alias`` whose targets the path policy admits, and, under the
server's roots, the models there and each adapter there on a base it would serve (a model under the roots or a
loaded one). Without roots the server serves only what is loaded, so only that (and names for it) is listed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mlxman.errors import MlxmanError
from mlxman.library.aliases import load_aliases, names_by_key
from mlxman.library.catalog import normal_spec
from mlxman.pool.keys import SEPARATOR
from mlxman.pool.views import EntryStatus
from mlxman.server.security import PathPolicy

log = logging.getLogger("mlxman.server")

OWNER = "mlxman"
# How long the models and adapters found under the roots are reused (names and pool entries are always fresh).
ROOTS_LISTING_SECONDS = 5.0


def entry_names(keys: list[str]) -> dict[str, list[str]]:
    """The names for each pool key; none when the names file cannot be read (the pool still answers)."""
    try:
        return names_by_key(keys)
    except MlxmanError as exc:
        log.warning("names not shown: %s", exc.message)
        return {key: [] for key in keys}


def servable_models(policy: PathPolicy, entries: list[EntryStatus], created: int) -> list[dict[str, Any]]:
    """OpenAI-shaped model objects, loaded entries first, each id once; ``loaded``, ``kind``, ``names`` and
    ``target`` are mlxman's own fields."""
    loaded = {e.key for e in entries}
    names = entry_names(sorted(loaded))
    listed: dict[str, dict[str, Any]] = {}

    def add(model_id: str, kind: str | None, key: str, **extra: Any) -> None:
        if model_id not in listed:
            listed[model_id] = {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": OWNER,
                "kind": kind,
                "loaded": key in loaded,
                **extra,
            }

    kinds = {e.key: e.kind for e in entries}
    for e in entries:
        add(e.key, e.kind, e.key, names=names.get(e.key, []))
    for name, key in _names(policy, loaded):
        add(name, kinds.get(key.partition(SEPARATOR)[0]), key, target=key)
    if policy.roots:
        for model_id, kind, key in _cached_under_roots(policy, kinds):
            add(model_id, kind, key)
    return list(listed.values())


def _names(policy: PathPolicy, loaded: set[str]) -> list[tuple[str, str]]:
    """Each name the policy admits, with the pool key it stands for."""
    try:
        aliases = load_aliases()
    except MlxmanError as exc:
        log.warning("names not listed: %s", exc.message)
        return []
    found = []
    for name in sorted(aliases):
        try:
            found.append((name, policy.resolve(name, loaded).key))
        except (MlxmanError, OSError):
            continue  # not served here (outside the roots, not loaded, or gone): not listed
    return found


_roots_lock = threading.Lock()
_Found = list[tuple[str, str | None, str]]
_roots_cache: dict[tuple[int, frozenset[tuple[str, str]]], tuple[float, _Found]] = {}


def _cached_under_roots(policy: PathPolicy, kinds: dict[str, str]) -> _Found:
    """``_under_roots``, reused for ROOTS_LISTING_SECONDS while the pool holds the same entries: a picker that
    polls does not walk the roots (about 1 ms per adapter) each time."""
    key = (id(policy), frozenset(kinds.items()))
    now = time.monotonic()
    with _roots_lock:
        cached = _roots_cache.get(key)
    if cached is not None and now - cached[0] < ROOTS_LISTING_SECONDS:
        return cached[1]
    found = _under_roots(policy, kinds)
    with _roots_lock:
        _roots_cache.clear()  # one server, one pool: only the latest listing is worth keeping
        _roots_cache[key] = (now, found)
    return found


def _under_roots(policy: PathPolicy, kinds: dict[str, str]) -> _Found:
    """What lies in the roots, as (id a request may send, kind, the pool key it stands for): cached models
    whose snapshot is in a root (by their Hugging Face ids), model folders, and each adapter there on a base
    the server would serve. ``kinds`` holds the pool's keys and their kinds."""
    from mlxman.library.catalog import cached_models, scan_folders

    loaded = set(kinds)
    found: _Found = []
    # What an adapter's config may name its base by -> the id to send for that base, and its kind.
    bases: dict[str, tuple[str, str | None]] = {}
    for key, loaded_kind in kinds.items():
        if SEPARATOR not in key:
            bases[key] = (key, loaded_kind)
            if "@" in key and not key.startswith("/"):
                bases.setdefault(key.partition("@")[0], (key, loaded_kind))  # repo@revision, by its repo

    def admit(spec: str) -> str | None:
        try:
            return policy.resolve(spec, loaded).key
        except (MlxmanError, OSError):
            return None  # outside the roots, linking out of them, or broken: not listed

    snapshots: set[str] = set()
    for model in cached_models():
        if model.path is None or model.error is not None or not _in_roots(policy, model.path):
            continue
        cached_key = admit(model.id)
        if cached_key is None:
            continue
        kind = kinds.get(cached_key) or _kind(Path(model.path))
        snapshots.add(str(Path(model.path).resolve()))
        for spelling in (model.id, model.path):  # an adapter records its base by id or by folder
            bases.setdefault(spelling, (model.id, kind))
        found.append((model.id, kind, cached_key))
    models, adapters = scan_folders(policy.roots)
    for model in models:
        if model.path is None or model.error is not None or model.path in snapshots:
            continue
        folder_key = admit(model.path)
        if folder_key is None:
            continue
        kind = kinds.get(folder_key) or _kind(Path(model.path))
        bases.setdefault(model.path, (folder_key, kind))
        found.append((folder_key, kind, folder_key))
    for adapter in adapters:
        base = bases.get(normal_spec(adapter.base)) if adapter.error is None else None
        if base is None:
            continue
        spec = f"{base[0]}{SEPARATOR}{adapter.path}"
        pair_key = admit(spec)
        if pair_key is not None:
            found.append((spec, base[1], pair_key))
    return found


def _in_roots(policy: PathPolicy, path: str) -> bool:
    """A cheap first look (the policy checks again, fully): is ``path``, links followed, in a root?"""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(root) for root in policy.roots)


def _kind(path: Path) -> str | None:
    from mlxman.models.resolve import read_config
    from mlxman.pool.kinds import detect_kind

    try:
        return detect_kind(path, read_config(path))
    except (MlxmanError, OSError, ValueError):
        return None
