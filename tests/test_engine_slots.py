"""Adapter slots: per-row LoRA in one forward equals each adapter applied by mlx-lm itself, row by row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxman.demo import DemoKit
from mlxman.engine.slots import SlotBank, SlotLinear, gather_dtype
from mlxman.pool.swap import read_adapter
from tests.engine_kit import small_variant

# Float32 on CPU: the batch computes the same matmuls as the serial models; allow only rounding noise.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def adapters(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    kit = demo_kit.adapters
    small = small_variant(kit["numbers"], tmp_path_factory.mktemp("small") / "small", rank=4, scale=3.0)
    return {"colors": kit["colors"], "numbers": kit["numbers"], "small": small}


def load(model_dir: Path, adapter: Path | None = None, quantize: bool = False) -> Any:
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.utils import load_adapters

    model = mlx_load(str(model_dir))[0]
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    if adapter is not None:
        load_adapters(model, str(adapter))
    model.eval()
    return model


def prompts(rows: int, length: int) -> mx.array:
    mx.random.seed(7)
    return mx.random.randint(3, 500, (rows, length))


@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "4-bit"])
def test_mixed_batch_matches_each_adapter_loaded_by_mlx_lm(
    demo_kit: DemoKit, adapters: dict[str, Path], quantize: bool
) -> None:
    model = load(demo_kit.model, quantize=quantize)
    bank = SlotBank(model, slots=4, max_rank=8)
    slot = {name: bank.acquire(read_adapter(path)) for name, path in adapters.items()}
    rows: list[str | None] = [None, "colors", "numbers", "small", None, "small", "colors", "numbers"]
    tokens = prompts(len(rows), 12)

    bank.select([slot[r] if r else 0 for r in rows])  # type: ignore[misc]
    logits = model(tokens)

    for name in (None, *adapters):
        serial = load(demo_kit.model, adapters[name] if name else None, quantize=quantize)
        for i, row in enumerate(rows):
            if row == name:
                want = serial(tokens[i : i + 1])
                diff = mx.abs(logits[i : i + 1] - want).max().item()
                assert diff <= TOLERANCE, f"row {i} ({row}): max abs diff {diff}"
    # The adapters really do differ from the base and from each other on these rows.
    assert mx.abs(logits[1] - logits[0]).max().item() > 0.1
    assert mx.abs(logits[3] - logits[0]).max().item() > 1e-3


def test_one_slot_for_every_row_matches_too(demo_kit: DemoKit, adapters: dict[str, Path]) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=2, max_rank=16)
    slot = bank.acquire(read_adapter(adapters["colors"]))
    assert slot is not None
    tokens = prompts(3, 5)
    bank.select([slot] * 3)
    want = load(demo_kit.model, adapters["colors"])(tokens)
    assert mx.abs(model(tokens) - want).max().item() <= TOLERANCE


def test_plain_rows_leave_the_base_untouched_and_clearing_restores_it(
    demo_kit: DemoKit, adapters: dict[str, Path]
) -> None:
    model = load(demo_kit.model)
    tokens = prompts(2, 6)
    before = model(tokens)
    mx.eval(before)
    bank = SlotBank(model, slots=2, max_rank=8)
    slot = bank.acquire(read_adapter(adapters["colors"]))
    assert slot is not None
    assert any(isinstance(m, SlotLinear) for _, m in model.named_modules())
    bank.select([0, 0])
    assert mx.array_equal(model(tokens), before)
    bank.release(slot)
    bank.clear_slot(slot)
    assert not any(isinstance(m, SlotLinear) for _, m in model.named_modules())
    assert bank.nbytes == bank.size * 4  # only the scales are left
    assert mx.array_equal(model(tokens), before)


def test_detach_gives_mlx_lm_the_plain_linears(demo_kit: DemoKit, adapters: dict[str, Path]) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=2, max_rank=8)
    bank.acquire(read_adapter(adapters["colors"]))
    bank.detach()
    assert not any(isinstance(m, SlotLinear) for _, m in model.named_modules())
    bank.attach()
    assert sum(isinstance(m, SlotLinear) for _, m in model.named_modules()) == 14


def test_slots_go_least_recently_used_and_never_from_active_rows(
    demo_kit: DemoKit, adapters: dict[str, Path]
) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=2, max_rank=8)
    colors, numbers, small = (read_adapter(adapters[n]) for n in ("colors", "numbers", "small"))
    a, b = bank.acquire(colors), bank.acquire(numbers)
    assert {a, b} == {1, 2}
    assert bank.acquire(small) is None  # both slots have active rows
    assert b is not None and a is not None
    bank.release(b)
    bank.release(a)
    assert bank.acquire(small) == a  # colors was acquired before numbers: its slot is the least recently used
    assert bank.slot_of(colors) is None and bank.slot_of(numbers) == b
    assert bank.acquire(numbers) == b  # still resident: no write


def test_memory_counts_every_targeted_linear(demo_kit: DemoKit, adapters: dict[str, Path]) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=3, max_rank=8)
    colors = read_adapter(adapters["colors"])
    # hidden 64, kv 32, mlp 128: per layer q 64+64, k 64+32, v 64+32, o 64+64, gate/up 64+128, down 128+64.
    per_layer = 128 + 96 + 96 + 128 + 192 + 192 + 192
    expected = 2 * per_layer * bank.size * 8 * 4
    assert bank.growth_bytes(colors) == expected
    bank.acquire(colors)
    assert bank.nbytes == expected + bank.size * 4
    assert bank.growth_bytes(read_adapter(adapters["numbers"])) == 0


def stack_bytes(model: Any, bank: SlotBank) -> int:
    """The bytes of the arrays the model's slot linears really hold, plus the scales."""
    stacks = {id(m._stack): m._stack for _, m in model.named_modules() if isinstance(m, SlotLinear)}
    return sum(int(s.a.nbytes) + int(s.b.nbytes) for s in stacks.values()) + bank.size * 4


def test_stacks_are_as_wide_as_the_largest_rank_resident(
    demo_kit: DemoKit, adapters: dict[str, Path]
) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=2, max_rank=16)
    small, colors = read_adapter(adapters["small"]), read_adapter(adapters["colors"])
    s = bank.acquire(small)
    assert bank.width == 4 and bank.nbytes == stack_bytes(model, bank)
    before, growth = bank.nbytes, bank.growth_bytes(colors)
    c = bank.acquire(colors)  # rank 8: the small adapter's stacks are re-padded, not lost
    assert bank.width == 8
    assert bank.nbytes == stack_bytes(model, bank) == before + growth
    assert {tuple(m._stack.a.shape) for _, m in model.named_modules() if isinstance(m, SlotLinear)} >= {
        (3, 64, 8)
    }

    rows = [s, c, 0, c, s]
    tokens = prompts(len(rows), 9)
    bank.select(rows)  # type: ignore[arg-type]
    logits = model(tokens)
    for adapter, slot in (("small", s), ("colors", c)):
        want = load(demo_kit.model, adapters[adapter])(tokens)
        for i, row in enumerate(rows):
            if row == slot:
                assert mx.abs(logits[i] - want[i]).max().item() <= TOLERANCE

    assert c is not None
    bank.release(c)
    bank.clear_slot(c)  # the rank-8 adapter left: the stacks narrow back to rank 4
    assert bank.width == 4 and bank.nbytes == stack_bytes(model, bank)
    assert s is not None
    bank.select([s])
    want = load(demo_kit.model, adapters["small"])(tokens[:1])
    assert mx.abs(model(tokens[:1]) - want).max().item() <= TOLERANCE


def test_what_cannot_use_a_slot_says_why(
    demo_kit: DemoKit, adapters: dict[str, Path], tmp_path: Path
) -> None:
    model = load(demo_kit.model)
    bank = SlotBank(model, slots=2, max_rank=4)
    assert "dora" in str(bank.problem(read_adapter(demo_kit.adapters["animals"])))
    assert "rank 8 is above the slot maximum 4" in str(bank.problem(read_adapter(adapters["colors"])))
    assert bank.problem(read_adapter(adapters["small"])) is None

    embedding = tmp_path / "embedding"
    embedding.mkdir()
    config = json.loads((adapters["colors"] / "adapter_config.json").read_text())
    (embedding / "adapter_config.json").write_text(json.dumps(config))
    mx.save_safetensors(
        str(embedding / "adapters.safetensors"),
        {"model.embed_tokens.lora_a": mx.zeros((512, 2)), "model.embed_tokens.lora_b": mx.zeros((2, 64))},
    )
    assert "Embedding" in str(bank.problem(read_adapter(embedding)))


def test_gather_dtype_is_float32_where_gather_mm_is_float32_only() -> None:
    assert gather_dtype(mx.float32) == mx.float32
    if mx.default_device() == mx.cpu:
        assert gather_dtype(mx.float16) == mx.float32
        assert gather_dtype(mx.bfloat16) == mx.float32
