"""Continuous batching on mlx-lm's ``BatchGenerator``, each row carrying its adapter slot beside its KV cache.

This is the only module that depends on how ``BatchGenerator`` works inside; ``check_batch_generator`` and
tests/test_engine_batching.py fail loudly when mlx-lm changes what it relies on:

- every row's cache list goes through the generator's merge / extend / filter / extract in batch order, so an
  extra entry at the end of the list (``SlotRows``) always names the slots of the rows in the model's batch;
- the model is called as ``model(tokens, cache=cache_list)`` for prefill chunks and for each decode step;
- ``insert(prompts, max_tokens=, caches=, all_tokens=, samplers=)`` returns row ids (a row may come with a
  prefilled cache and the tokens it holds), ``remove(ids, return_prompt_caches=)`` drops rows at once and can
  hand back their caches, ``next()`` returns (prompt responses, generation responses) whose generation items
  have ``uid``, ``token``, ``finish_reason``, and on a row's last token its ``prompt_cache`` and
  ``all_tokens`` (the tokens that cache holds).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxman.engine.sampling import Sampler
from mlxman.engine.slots import SlotBank

# The batch size mlx-lm's server prefills at once (--prompt-concurrency); rows beyond wait a step.
PREFILL_ROWS = 8


class BatchInternalsChanged(RuntimeError):
    """mlx-lm's BatchGenerator no longer works the way this module relies on."""


class SlotRows:
    """A pseudo cache entry holding each row's adapter slot; the generator keeps it aligned with the batch."""

    def __init__(self, slots: list[int]) -> None:
        self.slots = slots

    @classmethod
    def merge(cls, caches: Sequence[SlotRows]) -> SlotRows:
        return cls([s for c in caches for s in c.slots])

    def extend(self, other: SlotRows) -> None:
        self.slots = self.slots + other.slots

    def filter(self, keep: Sequence[int]) -> None:
        self.slots = [self.slots[int(i)] for i in keep]

    def extract(self, idx: int) -> SlotRows:
        return SlotRows([self.slots[idx]])

    def prepare(self, **kwargs: Any) -> None:
        pass

    def finalize(self) -> None:
        pass

    @property
    def state(self) -> list[mx.array]:
        return []

    @property
    def nbytes(self) -> int:
        return 0

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return not self.slots

    def is_trimmable(self) -> bool:
        return False


class SlotModel:
    """The model as the generator sees it: peel off the rows' slots, select them, run the real model."""

    def __init__(self, model: Any, bank: SlotBank | None) -> None:
        self.model = model
        self.bank = bank

    @property
    def layers(self) -> Any:
        return self.model.layers

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None, **kwargs: Any) -> mx.array:
        rows = cache[-1] if cache else None
        if not isinstance(rows, SlotRows) or len(rows.slots) != inputs.shape[0]:
            raise BatchInternalsChanged(
                "mlx-lm's BatchGenerator did not hand the model each row's slot entry in batch order "
                f"({len(rows.slots) if isinstance(rows, SlotRows) else 'no'} slots for "
                f"{inputs.shape[0]} rows); this mlx-lm version is not supported by the engine"
            )
        if self.bank is not None:
            self.bank.select(rows.slots)
        logits: mx.array = self.model(inputs, cache=rows_cache(cache), **kwargs)
        return logits


def rows_cache(cache: list[Any] | None) -> list[Any]:
    """The model's own cache entries: all but the trailing SlotRows."""
    assert cache is not None
    return cache[:-1]


@dataclass(frozen=True)
class Token:
    """One generated token of one row; ``finish_reason`` ("stop": end of sequence, "length") on its last."""

    uid: int
    token: int
    finish_reason: str | None


def cannot_batch(model: Any) -> str | None:
    """Why this model's requests cannot share a batch (its KV caches cannot merge); None when they can."""
    from mlx_lm.models.cache import make_prompt_cache

    for entry in make_prompt_cache(model):
        if not hasattr(entry, "merge"):
            return f"its {type(entry).__name__} cache cannot be merged into a batch"
    return None


def check_batch_generator() -> None:
    """Raise BatchInternalsChanged when mlx-lm's BatchGenerator lacks what this module uses."""
    from mlx_lm.generate import BatchGenerator, GenerationBatch
    from mlx_lm.models.cache import KVCache

    wanted: dict[Any, tuple[str, ...]] = {
        BatchGenerator.__init__: (
            "model",
            "max_tokens",
            "stop_tokens",
            "completion_batch_size",
            "prefill_batch_size",
            "prefill_step_size",
        ),
        BatchGenerator.insert: ("prompts", "max_tokens", "caches", "all_tokens", "samplers"),
        BatchGenerator.remove: ("uids", "return_prompt_caches"),
    }
    for fn, names in wanted.items():
        params = inspect.signature(fn).parameters
        missing = [n for n in names if n not in params]
        if missing:
            raise BatchInternalsChanged(f"BatchGenerator.{fn.__name__} has no {', '.join(missing)} parameter")
    fields = getattr(GenerationBatch.Response, "__dataclass_fields__", {})
    if not {"uid", "token", "finish_reason", "prompt_cache", "all_tokens"} <= set(fields):
        raise BatchInternalsChanged(
            "GenerationBatch.Response lacks uid, token, finish_reason, prompt_cache or all_tokens"
        )
    if not hasattr(KVCache, "merge") or not hasattr(BatchGenerator, "next"):
        raise BatchInternalsChanged("KVCache.merge or BatchGenerator.next is gone")


class Batch:
    """Rows decoding together on one base; each ``step`` advances every row by one token or one prefill chunk.

    Not thread-safe: one scheduler thread owns it (MLX keeps per-thread resources, so keep that thread).
    """

    def __init__(
        self,
        model: Any,
        bank: SlotBank | None,
        *,
        eos_token_ids: Sequence[int],
        max_rows: int,
        prefill_step_size: int,
    ) -> None:
        from mlx_lm.generate import BatchGenerator

        check_batch_generator()
        self.model = model
        self._wrapped = SlotModel(model, bank)
        self._generator: Any = BatchGenerator(
            self._wrapped,  # type: ignore[arg-type]
            stop_tokens=[[t] for t in eos_token_ids],
            completion_batch_size=max_rows,
            prefill_batch_size=min(max_rows, PREFILL_ROWS),
            prefill_step_size=prefill_step_size,
        )
        self._rows: set[int] = set()
        # Prompt tokens read so far by each row still prefilling (how far a cancelled prefill got).
        self._prefilled: dict[int, int] = {}
        # Rows that left with their KV kept: the tokens it holds and the model's cache entries.
        self._kept: dict[int, tuple[list[int], list[Any]]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(
        self,
        tokens: list[int],
        *,
        slot: int,
        max_tokens: int,
        sampler: Sampler | None,
        cache: list[Any] | None = None,
        cached: int = 0,
    ) -> int:
        """Queue a row to join at the next step; returns its id. With ``cache`` (the model's cache entries
        holding the KV of ``tokens[:cached]``) only the rest of the prompt is prefilled."""
        from mlx_lm.models.cache import make_prompt_cache

        if cache is None or not 0 < cached < len(tokens):
            cache, cached = make_prompt_cache(self.model), 0
        (uid,) = self._generator.insert(
            [tokens[cached:]],
            max_tokens=[max_tokens],
            caches=[[*cache, SlotRows([slot])]],
            all_tokens=[tokens[:cached]],
            samplers=[sampler],
        )
        self._rows.add(uid)
        return int(uid)

    def remove(self, uid: int, *, keep_kv: bool = False) -> None:
        """Drop a row now (cancelled or stopped by text); a row that already finished is ignored. With
        ``keep_kv`` its KV so far is kept for ``take_kv``."""
        if uid in self._rows:
            caches = self._generator.remove([uid], return_prompt_caches=keep_kv)
            self._rows.discard(uid)
            if uid in caches:
                cache, tokens = caches[uid]
                self._keep(uid, list(tokens), cache)

    def take_kv(self, uid: int) -> tuple[list[int], list[Any]] | None:
        """The KV a row left with (the tokens it holds, the model's cache entries), once; None if none."""
        return self._kept.pop(uid, None)

    def _keep(self, uid: int, tokens: list[int], cache: list[Any]) -> None:
        model_cache = [c for c in cache if not isinstance(c, SlotRows)]
        if tokens and model_cache and all(c.size() == len(tokens) for c in model_cache):
            self._kept[uid] = (tokens, model_cache)

    def prefilled(self, uid: int) -> int:
        """Prompt tokens a row that left while prefilling had read (forgotten once asked)."""
        return self._prefilled.pop(uid, 0)

    def step(self) -> list[Token]:
        """One decode step for the rows generating, and one prefill chunk for the rows joining."""
        if not self._rows:
            return []
        prompts, responses = self._generator.next()
        for p in prompts:
            self._prefilled[int(p.uid)] = int(p.progress[0])
        tokens = []
        for r in responses:
            tokens.append(Token(int(r.uid), int(r.token), r.finish_reason))
            self._prefilled.pop(int(r.uid), None)
            if r.finish_reason is not None:
                self._rows.discard(int(r.uid))
                if r.prompt_cache is not None and r.all_tokens is not None:
                    self._keep(int(r.uid), list(r.all_tokens), r.prompt_cache)
        return tokens

    def close(self) -> None:
        if self._rows:
            self._generator.remove(list(self._rows))
            self._rows.clear()
        self._generator.close()
