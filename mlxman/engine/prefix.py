"""The prefix cache: the KV of finished requests, so a later request sharing their prefix skips its prefill.

Built on mlx-lm's own ``LRUPromptCache`` (a token trie with LRU eviction, the one its server uses). Each entry
is keyed by the adapter as well as the tokens, because the KV depends on the adapter: a request only ever
reuses KV computed on the same adapter (or on the plain base). Its bytes count in the engine's memory grant,
and its entries are the first thing the engine gives up when a request needs room.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mlxman.pool.swap import AdapterWeights

# The most KV the prefix cache keeps for one base, and at most this share of what the engine can ever hold.
DEFAULT_PREFIX_CACHE_BYTES = 512 * 1024 * 1024
PREFIX_CACHE_SHARE = 0.1
# mlx-lm's server keeps 10 prompt caches by default (--prompt-cache-size).
DEFAULT_PREFIX_ENTRIES = 10
# The plain base's key in the trie (an adapter's key is its path).
BASE = ""


def adapter_key(adapter: AdapterWeights | None) -> str:
    return BASE if adapter is None else str(adapter.path)


class PrefixCache:
    """KV of earlier requests on one base, keyed by (adapter, tokens). One thread (the engine's) uses it."""

    def __init__(self, max_bytes: int, max_entries: int = DEFAULT_PREFIX_ENTRIES) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max(max_bytes, 0))
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return int(self._lru.nbytes)

    def fetch(self, adapter: AdapterWeights | None, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A copy of the KV of the longest cached prefix of ``tokens`` on this adapter, and how many tokens it
        covers; at least one token is always left to prefill (its logits give the first new token)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        if self.max_bytes <= 0 or not len(self._lru):
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(adapter_key(adapter), list(tokens))
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is cached: read its last token again
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = list(tokens[-1:])
        covered = len(tokens) - len(rest)
        if covered <= 0:
            return None, 0
        self.hits += 1
        self.reused_tokens += covered
        return cache, covered

    def store(self, adapter: AdapterWeights | None, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep the KV of ``tokens`` (a row's prompt and answer), evicting the oldest over the cap."""
        if self.max_bytes <= 0 or not tokens or any(c.empty() for c in cache):
            return
        if sum(c.nbytes for c in cache) > self.max_bytes:
            return
        self._lru.insert_cache(adapter_key(adapter), list(tokens), cache)

    def evict_one(self) -> bool:
        """Drop the least recently used entry; False when there was none."""
        if not len(self._lru):
            return False
        self._lru.trim_to(n_sequences=len(self._lru) - 1)
        return True

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)
