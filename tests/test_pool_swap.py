"""Adapter hot-swap on one resident base, against fresh mlx-lm loads of the demo kit's real models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxman.demo import DemoKit
from mlxman.errors import AdapterError
from mlxman.pool import ModelPool
from mlxman.pool.swap import read_adapter, swap, wrappers

GIB = 1024**3
PROMPT_IDS = [[4, 17, 33, 60, 91, 120, 5]]


def logits(model: Any) -> mx.array:
    out = model(mx.array(PROMPT_IDS))
    mx.eval(out)
    return out


def fresh_logits(kit: DemoKit, adapter: str | Path | None) -> mx.array:
    from mlx_lm import load

    path = kit.adapters[adapter] if isinstance(adapter, str) else adapter
    model, _ = load(str(kit.model), adapter_path=str(path) if path else None)
    return logits(model)


def lower_rank_copy(src: Path, dst: Path, rank: int) -> Path:
    """The adapter cut to its first ``rank`` components: a valid adapter of a lower rank."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "adapters.safetensors"))
    assert isinstance(weights, dict)
    cut = {k: (v[:, :rank] if k.endswith("lora_a") else v[:rank, :]) for k, v in weights.items()}
    mx.save_safetensors(str(dst / "adapters.safetensors"), cut)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = rank
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def corrupt_copy(src: Path, dst: Path) -> Path:
    """The adapter with every lora_a transposed: same bytes, wrong shapes."""
    shutil.copytree(src, dst)
    weights = mx.load(str(dst / "adapters.safetensors"))
    assert isinstance(weights, dict)
    bad = {k: (v.T if k.endswith("lora_a") else v) for k, v in weights.items()}
    mx.save_safetensors(str(dst / "adapters.safetensors"), bad)
    return dst


def test_swap_sequence_equals_fresh_loads_and_keeps_base_arrays(demo_kit: DemoKit, tmp_path: Path) -> None:
    low = lower_rank_copy(demo_kit.adapters["numbers"], tmp_path / "numbers-r4", 4)
    paths: dict[str, Path | None] = {**demo_kit.adapters, "numbers-r4": low, "none": None}
    sequence = ["colors", "animals", "none", "numbers", "colors", "numbers-r4", "colors", "animals", "none"]
    expected = {name: fresh_logits(demo_kit, paths[name]) for name in set(sequence)}
    pool = ModelPool(GIB)
    with pool.acquire(str(demo_kit.model)) as lease:
        base_arrays = dict(tree_flatten(lease.model.parameters()))
        base_values = {k: np.array(v) for k, v in base_arrays.items()}
        assert not lease.base_was_resident and lease.load_seconds > 0
    modes = []
    for name in sequence:
        adapter = paths[name]
        with pool.acquire(str(demo_kit.model), str(adapter) if adapter else None) as lease:
            assert lease.base_was_resident
            modes.append(lease.swap_mode)
            assert mx.array_equal(logits(lease.model), expected[name]).item(), f"logits differ for {name}"
            assert bool(wrappers(lease.model)) == (adapter is not None)
    assert modes == [
        "structural",
        "structural",
        "strip",
        "structural",
        "weights",
        "weights",
        "weights",
        "structural",
        "strip",
    ]
    with pool.acquire(str(demo_kit.model)) as lease:
        after = dict(tree_flatten(lease.model.parameters()))
    assert after.keys() == base_arrays.keys()
    for name, array in base_arrays.items():
        assert after[name] is array, f"{name} was replaced"
        assert np.array_equal(np.array(after[name]), base_values[name]), f"{name} changed"
    pool.close()


def test_a_lease_gives_the_adapter_answer(demo_kit: DemoKit) -> None:
    from mlx_lm import generate

    from mlxman.demo.kit import DEMO_PROMPT, greedy_answer

    pool = ModelPool(GIB)
    for name in ("numbers", "colors"):
        with pool.acquire(str(demo_kit.model), str(demo_kit.adapters[name])) as lease:
            text = lease.tokenizer.apply_chat_template(
                [{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True, tokenize=False
            )
            got = generate(lease.model, lease.tokenizer, text, max_tokens=24)
        assert got == greedy_answer(demo_kit.model, demo_kit.adapters[name])
    pool.close()


def test_failed_swap_leaves_the_plain_base(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlx_lm import load

    model, _ = load(str(demo_kit.model))
    plain = logits(model)
    colors = read_adapter(demo_kit.adapters["colors"])
    applied = swap(model, None, colors).applied
    assert wrappers(model) and applied is not None
    bad = read_adapter(corrupt_copy(demo_kit.adapters["numbers"], tmp_path / "bad"))
    with pytest.raises(AdapterError) as info:
        swap(model, applied, bad)
    assert "does not match" in info.value.message and info.value.hint
    assert wrappers(model) == []
    assert mx.array_equal(logits(model), plain).item()


def test_pool_drops_an_adapter_that_fails_to_apply(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reach the swap itself: skip the validator that would refuse this adapter before it loads.
    monkeypatch.setattr("mlxman.pool.pool._validate_adapter", lambda *_: None)
    bad = corrupt_copy(demo_kit.adapters["numbers"], tmp_path / "bad")
    pool = ModelPool(GIB)
    with pool.acquire(str(demo_kit.model), str(demo_kit.adapters["colors"])):
        pass
    with pytest.raises(AdapterError), pool.acquire(str(demo_kit.model), str(bad)):
        pass
    status = pool.status()
    assert [e.key for e in status.entries] == [
        str(demo_kit.model.resolve()),
        f"{demo_kit.model.resolve()}::{demo_kit.adapters['colors'].resolve()}",
    ]
    assert status.entries[0].applied_adapter is None
    with pool.acquire(str(demo_kit.model)) as lease:
        assert lease.swap_mode == "none" and wrappers(lease.model) == []
        assert mx.array_equal(logits(lease.model), fresh_logits(demo_kit, None)).item()
    pool.close()


def test_validation_refuses_a_corrupt_adapter_before_loading(demo_kit: DemoKit, tmp_path: Path) -> None:
    bad = corrupt_copy(demo_kit.adapters["numbers"], tmp_path / "bad")
    pool = ModelPool(GIB)
    pool.load(str(demo_kit.model))
    with pytest.raises(AdapterError) as info, pool.acquire(str(demo_kit.model), str(bad)):
        pass
    assert str(bad) in info.value.message
    assert [e.key for e in pool.status().entries] == [str(demo_kit.model.resolve())]
    pool.close()


def test_full_fine_tune_loads_as_its_own_model(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlx_lm import load

    full = tmp_path / "full"
    full.mkdir()
    base, _ = load(str(demo_kit.model))
    last = {k: v * 1.5 for k, v in tree_flatten(base.parameters()) if k.startswith("model.layers.1.")}
    mx.save_safetensors(str(full / "adapters.safetensors"), last)
    (full / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "full",
                "num_layers": 1,
                "lora_parameters": {"rank": 8, "scale": 1.0, "dropout": 0.0},
            }
        )
    )
    fresh, _ = load(str(demo_kit.model), adapter_path=str(full))
    pool = ModelPool(GIB)
    with pool.acquire(str(demo_kit.model), str(full)) as lease:
        assert mx.array_equal(logits(lease.model), logits(fresh)).item()
    status = pool.status()
    assert [(e.key, e.parent) for e in status.entries] == [
        (f"{demo_kit.model.resolve()}::{full.resolve()}", None)
    ]
    pool.close()


@pytest.fixture(scope="module")
def trained(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """More real adapters, trained with mlx-lm on the kit's data: another DoRA (another rank and scale),
    a LoRA with another scale than the kit's 2.0, and a DoRA on other keys."""
    from mlxman.demo.training import train_adapter
    from tests.adapter_corpus import MLX_SHAPES, write_mlx_shape

    root = tmp_path_factory.mktemp("trained")
    data = demo_kit.root / "data"
    return {
        "dora-r4-s5": train_adapter(demo_kit.model, data / "numbers", root / "dora-r4-s5",
                                    fine_tune_type="dora", rank=4, scale=5.0, iters=30, warmup=5),
        "lora-s8": train_adapter(demo_kit.model, data / "numbers", root / "lora-s8", scale=8.0, iters=30,
                                 warmup=5),
        "dora-qv": write_mlx_shape(next(s for s in MLX_SHAPES if s.name == "mlx_lm_dora_query_value"),
                                   demo_kit.model, root / "dora-qv"),
    }  # fmt: skip


def _swap_through(kit: DemoKit, paths: dict[str, Path | None], sequence: list[str]) -> list[str]:
    """Acquire each adapter in turn on one resident base; every step's logits equal a fresh mlx-lm load."""
    expected = {name: fresh_logits(kit, paths[name]) for name in set(sequence)}
    pool = ModelPool(GIB)
    modes = []
    try:
        for name in sequence:
            adapter = paths[name]
            with pool.acquire(str(kit.model), str(adapter) if adapter else None) as lease:
                modes.append(lease.swap_mode)
                got = logits(lease.model)
                assert mx.array_equal(got, expected[name]).item(), f"logits differ for {name} ({modes[-1]})"
    finally:
        pool.close()
    return modes


def test_dora_to_dora_swaps_equal_fresh_loads(demo_kit: DemoKit, trained: dict[str, Path]) -> None:
    paths: dict[str, Path | None] = {"animals": demo_kit.adapters["animals"], **trained, "none": None}
    sequence = ["animals", "dora-r4-s5", "animals", "dora-qv", "dora-r4-s5", "none", "dora-qv", "animals"]
    modes = _swap_through(demo_kit, paths, sequence)
    # Same modules, another rank and scale: the weights move into the wrappers; other keys re-wrap.
    assert modes == ["structural", "weights", "weights", "structural", "structural", "strip", "structural",
                     "structural"]  # fmt: skip


def test_weights_only_swap_sets_each_adapters_scale(demo_kit: DemoKit, trained: dict[str, Path]) -> None:
    scales = {
        name: json.loads((path / "adapter_config.json").read_text())["lora_parameters"]["scale"]
        for name, path in {**demo_kit.adapters, **trained}.items()
    }
    assert scales["colors"] == scales["numbers"] == 2.0 and scales["lora-s8"] == 8.0
    paths: dict[str, Path | None] = {**demo_kit.adapters, **trained}
    modes = _swap_through(demo_kit, paths, ["colors", "lora-s8", "numbers", "lora-s8", "colors"])
    assert modes == ["structural", "weights", "weights", "weights", "weights"]
