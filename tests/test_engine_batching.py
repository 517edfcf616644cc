"""What the engine relies on inside mlx-lm's BatchGenerator: these fail loudly when mlx-lm changes it."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest

from mlxman.demo import DemoKit
from mlxman.engine.batching import (
    Batch,
    BatchInternalsChanged,
    SlotModel,
    SlotRows,
    cannot_batch,
    check_batch_generator,
)
from mlxman.engine.slots import SlotBank
from mlxman.pool.swap import read_adapter


def test_the_batch_generator_has_what_the_engine_uses() -> None:
    check_batch_generator()


class Recorder(SlotBank):
    """A slot bank that records the slots of every forward, in batch order."""

    seen: list[list[int]]

    def select(self, slots: Any) -> None:
        self.seen.append(list(slots))
        super().select(slots)


def test_each_rows_slot_follows_it_through_joins_and_leaves(demo_kit: DemoKit) -> None:
    """Rows on three slots join at different steps and leave at different lengths; every forward gets one slot
    per row (the model wrapper checks), and rows on different slots share forwards."""
    from mlx_lm import load

    model = load(str(demo_kit.model))[0]
    bank = Recorder(model, slots=3, max_rank=8)
    bank.seen = []
    slots = [bank.acquire(read_adapter(demo_kit.adapters[n])) for n in ("colors", "numbers")]
    assert None not in slots
    batch = Batch(model, bank, eos_token_ids=[], max_rows=8, prefill_step_size=4)
    plan = [(0, 9), (slots[0], 3), (slots[1], 14), (slots[0], 6), (0, 2), (slots[1], 11)]
    steps = 0
    generated: dict[int, int] = {}
    while plan or len(batch):
        if plan and steps % 2 == 0:
            slot, max_tokens = plan.pop(0)
            prompt = list(range(5, 5 + 3 + steps))  # longer prompts for later rows: several prefill chunks
            batch.add(prompt, slot=int(slot or 0), max_tokens=max_tokens, sampler=None)
        for token in batch.step():
            generated[token.uid] = generated.get(token.uid, 0) + 1
        steps += 1
    assert sorted(generated.values()) == sorted([9, 3, 14, 6, 2, 11])
    mixed = [s for s in bank.seen if len(set(s)) > 1]
    assert mixed, "rows on different slots never shared a forward"
    assert all(len(s) <= 6 for s in bank.seen)
    batch.close()


def test_a_forward_without_the_rows_slots_fails_loudly(demo_kit: DemoKit) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model = load(str(demo_kit.model))[0]
    wrapped = SlotModel(model, None)
    tokens = mx.array([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(BatchInternalsChanged, match="not supported"):
        wrapped(tokens, cache=make_prompt_cache(model))
    with pytest.raises(BatchInternalsChanged, match="1 slots for 2 rows"):
        wrapped(tokens, cache=[*make_prompt_cache(model), SlotRows([0])])


def test_slot_rows_merge_filter_extend_and_extract_like_a_batch_cache() -> None:
    rows = SlotRows.merge([SlotRows([1]), SlotRows([0]), SlotRows([2])])
    rows.extend(SlotRows([3, 1]))
    rows.filter([0, 2, 4])
    assert rows.slots == [1, 2, 1]
    assert rows.extract(1).slots == [2]
    assert rows.nbytes == 0 and rows.state == []


def test_models_whose_caches_cannot_merge_say_so(demo_kit: DemoKit) -> None:
    from mlx_lm import load
    from mlx_lm.models.cache import QuantizedKVCache

    model = load(str(demo_kit.model))[0]
    assert cannot_batch(model) is None

    class QuantizedCacheModel:
        layers = model.layers

        def make_cache(self) -> list[Any]:
            return [QuantizedKVCache() for _ in self.layers]

    assert "QuantizedKVCache" in str(cannot_batch(QuantizedCacheModel()))
