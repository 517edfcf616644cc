"""The CPU weight layout: re-laid float32 linears give bit-identical logits, and the pool loads them so."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxman.demo import DemoKit
from mlxman.engine.slots import SlotBank
from mlxman.pool.layout import column_major_linears
from mlxman.pool.swap import read_adapter

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the layout is re-laid on the CPU only"
)


def load(demo_kit: DemoKit) -> Any:
    from mlx_lm import load as mlx_load

    return mlx_load(str(demo_kit.model))[0]


def linears(model: Any) -> dict[str, mx.array]:
    """The weights the layout re-lays: float linears and embeddings."""
    return {name: m.weight for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}


def test_relaid_linears_give_bit_identical_logits_in_decode_and_prefill_shapes(demo_kit: DemoKit) -> None:
    model = load(demo_kit)
    mx.random.seed(3)
    shapes = [(1, 1), (8, 1), (1, 30), (8, 12)]
    inputs = [mx.random.randint(3, 500, shape) for shape in shapes]
    before = [model(x) for x in inputs]
    weights = linears(model)
    mx.eval(before, weights)

    assert column_major_linears(model) == len(weights) > 0

    for x, want in zip(inputs, before, strict=True):
        assert mx.array_equal(model(x), want), f"logits changed for input shape {x.shape}"
    for name, weight in linears(model).items():
        assert weight.shape == weights[name].shape and mx.array_equal(weight, weights[name]), name


def test_relaying_twice_or_with_adapter_slots_changes_nothing(demo_kit: DemoKit) -> None:
    model = load(demo_kit)
    bank = SlotBank(model, slots=2, max_rank=8)
    slot = bank.acquire(read_adapter(demo_kit.adapters["colors"]))
    assert slot is not None
    tokens = mx.array([[5, 9, 41, 7], [3, 8, 120, 4]])
    bank.select([slot, 0])
    want = model(tokens)
    mx.eval(want)
    # The slots' wrappers hold the base linears; re-laying reaches them through the model's modules.
    assert column_major_linears(model) > 0
    assert mx.array_equal(model(tokens), want)
    assert column_major_linears(model) > 0
    assert mx.array_equal(model(tokens), want)


def test_half_precision_and_quantized_weights_are_left_as_loaded(demo_kit: DemoKit) -> None:
    half = load(demo_kit)
    half.set_dtype(mx.float16)
    assert column_major_linears(half) == 0
    quantized = load(demo_kit)
    nn.quantize(quantized, group_size=32, bits=4)
    tokens = mx.array([[5, 9, 41, 7]])
    want = quantized(tokens)
    mx.eval(want)
    # Only float32 Linear or Embedding layers left unquantized (none, here) are re-laid.
    assert column_major_linears(quantized) == len(linears(quantized)) == 0
    assert mx.array_equal(quantized(tokens), want)


def test_a_tied_output_projection_reads_the_same_table(demo_kit: DemoKit) -> None:
    """Models with tied embeddings multiply by the embedding table for their logits (``as_linear``)."""
    model = load(demo_kit)
    embedding = model.model.embed_tokens
    ids = mx.array([[3, 99, 7, 400]])
    hidden = mx.random.normal((8, 3, embedding.weight.shape[1]))
    rows, logits = embedding(ids), embedding.as_linear(hidden)
    mx.eval(rows, logits)
    column_major_linears(model)
    assert mx.array_equal(embedding(ids), rows)
    assert mx.array_equal(embedding.as_linear(hidden), logits)


def relaying_peak(model: Any) -> int:
    """Bytes above what was active that re-laying ``model`` needed: above 0 only when a weight was copied."""
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    column_major_linears(model)
    return int(mx.get_peak_memory()) - before


def test_the_pool_loads_text_models_laid_out_already(demo_kit: DemoKit) -> None:
    from mlxman.pool.kinds import TEXT
    from mlxman.pool.loaders import load_model

    loaded = load_model(demo_kit.model, TEXT)
    plain = load(demo_kit)
    tokens = mx.array([[5, 9, 41, 7], [3, 8, 120, 4]])
    assert mx.array_equal(loaded.model(tokens), plain(tokens))
    # Laid out at load: doing it again copies nothing, where a model straight from mlx-lm copies its weights.
    assert relaying_peak(loaded.model) <= 0 < relaying_peak(plain)
