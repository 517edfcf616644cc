"""Real-world adapter_config.json shapes: mlxman never refuses what mlx-lm loads, yet catches the rest."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from mlxman.adapters.info import adapter_info
from mlxman.adapters.validate import validate_adapter
from mlxman.demo import DemoKit
from mlxman.errors import AdapterError
from mlxman.pool import ModelPool
from tests.adapter_corpus import (
    MLX_SHAPES,
    PEFT_SHAPES,
    RealShape,
    peft_modules,
    peft_rank_alpha,
    write_mlx_shape,
    write_peft_shape,
)
from tests.helpers import run_cli

GIB = 1024**3
TOKENS = [[1, 5, 9, 12, 7, 3, 30, 2]]


def _logits(model: Any) -> mx.array:
    out = model(mx.array(TOKENS))
    mx.eval(out)
    return out


def _mlx_lm_logits(base: Path, adapter: Path | None) -> mx.array:
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    return _logits(model)


def _mlx_lm_verdict(base: Path, adapter: Path) -> mx.array | None:
    """mlx-lm's own answer: the logits when it loads the adapter, None when it refuses."""
    try:
        return _mlx_lm_logits(base, adapter)
    except (ValueError, KeyError, AttributeError, TypeError):
        return None


@pytest.mark.parametrize("shape", MLX_SHAPES, ids=[s.name for s in MLX_SHAPES])
def test_mlx_lm_shape_agrees_with_mlx_lm(shape: RealShape, demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = write_mlx_shape(shape, demo_kit.model, tmp_path / shape.name)
    fresh = _mlx_lm_verdict(demo_kit.model, adapter)
    assert (fresh is not None) == shape.loads, "mlx-lm's verdict on this shape changed"
    for model in (None, demo_kit.model):
        report = validate_adapter(adapter, model)
        assert report.format == "mlx", report.summary()
        assert report.ok == shape.loads, report.summary()
        if not shape.loads:
            assert any(shape.culprit in f"{e.message} ({e.hint})" for e in report.errors), report.summary()
    assert adapter_info(adapter).format == "mlx"
    pool = ModelPool(GIB)
    try:
        if fresh is None:
            with (
                pytest.raises(AdapterError, match="cannot be used"),
                pool.acquire(str(demo_kit.model), str(adapter)),
            ):
                pass
            return
        with pool.acquire(str(demo_kit.model), str(adapter)) as lease:
            assert bool(mx.array_equal(_logits(lease.model), fresh)), "pool and mlx-lm disagree"
    finally:
        pool.close()


LORA_SHAPES = [s for s in MLX_SHAPES if s.loads and s.config.get("fine_tune_type") != "full"]


@pytest.mark.parametrize("shape", LORA_SHAPES, ids=[s.name for s in LORA_SHAPES])
def test_a_module_left_out_is_still_caught(shape: RealShape, demo_kit: DemoKit, tmp_path: Path) -> None:
    """mlx-lm silently loads an adapter missing one module's tensors; mlxman flags it."""
    from safetensors.numpy import load_file, save_file

    adapter = write_mlx_shape(shape, demo_kit.model, tmp_path / shape.name)
    weights = load_file(str(adapter / "adapters.safetensors"))
    victim = sorted(weights)[-1].rsplit(".", 1)[0]
    save_file({k: v for k, v in weights.items() if not k.startswith(victim + ".")},
              str(adapter / "adapters.safetensors"))  # fmt: skip
    assert _mlx_lm_verdict(demo_kit.model, adapter) is not None  # mlx-lm does not notice
    with_base = validate_adapter(adapter, demo_kit.model)
    assert not with_base.ok and any(victim in e.message for e in with_base.errors), with_base.summary()
    alone = validate_adapter(adapter)
    if len({k.split(".layers.")[1].split(".")[0] for k in weights}) > 1:  # other blocks show the gap
        assert any(victim in f.message for f in alone.findings), alone.summary()


def test_mlx_adapter_with_peft_style_keys_generates(demo_kit: DemoKit, tmp_path: Path) -> None:
    """The issue's folder: adapters.safetensors + mlx-lm keys + lora_rank/lora_alpha/lora_layers."""
    shape = next(s for s in MLX_SHAPES if s.name == "mlx_lm_with_peft_style_keys")
    adapter = write_mlx_shape(shape, demo_kit.model, tmp_path / "a")
    validate = run_cli("adapter", "validate", str(adapter), "--json")
    assert validate.exit_code == 0, validate.stdout
    assert json.loads(validate.stdout)["format"] == "mlx"
    generate = run_cli(
        "generate", "--model", str(demo_kit.model), "--adapter", str(adapter), "--prompt", "hi",
        "--max-tokens", "3",
    )  # fmt: skip
    assert generate.exit_code == 0, generate.stderr


def test_num_layers_over_the_blocks_covered_names_no_negative_block(
    demo_kit: DemoKit, tmp_path: Path
) -> None:
    shape = next(s for s in MLX_SHAPES if s.name == "mlx_lm_defaults_num_layers_over_blocks")
    adapter = write_mlx_shape(shape, demo_kit.model, tmp_path / "a")
    result = run_cli("adapter", "validate", str(adapter))
    assert result.exit_code == 0, result.stdout
    # Blocks 1 of 2 left out: the finding names real blocks only.
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(adapter / "adapters.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if ".layers.0." not in k}, str(adapter / "adapters.safetensors")
    )
    report = validate_adapter(adapter)
    assert not report.ok
    text = report.summary()
    assert re.search(r"(^|[\s,(])-\d", text) is None and "block 0 has no tensors" in text, text


def _peft_merged_logits(base: Path, adapter: Path, config: dict[str, Any]) -> mx.array:
    """PEFT's math by hand: W + B A * alpha / r (alpha / sqrt(r) with rsLoRA), in float64."""
    from mlx_lm import load
    from safetensors.numpy import load_file

    base_weights = load_file(str(base / "model.safetensors"))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    merged = []
    for module in peft_modules(config, base_weights):
        a = tensors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = tensors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        rank, alpha = peft_rank_alpha(config, module)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        w = base_weights[f"{module}.weight"].astype(np.float64) + (b @ a) * scale
        merged.append((f"{module}.weight", mx.array(w.astype(np.float32))))
    model, _ = load(str(base))
    model.load_weights(merged, strict=False)
    return _logits(model)


@pytest.mark.parametrize("shape", PEFT_SHAPES, ids=[s.name for s in PEFT_SHAPES])
def test_peft_shape_validates_and_converts(shape: RealShape, demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = write_peft_shape(shape, demo_kit.model, tmp_path / shape.name)
    for model in (None, demo_kit.model):
        report = validate_adapter(adapter, model)
        assert report.format == "peft" and report.ok, report.summary()
    assert _mlx_lm_verdict(demo_kit.model, adapter) is None  # mlx-lm cannot load PEFT folders
    pool = ModelPool(GIB)
    try:
        with pytest.raises(AdapterError, match="convert"), pool.acquire(str(demo_kit.model), str(adapter)):
            pass
    finally:
        pool.close()
    converted = tmp_path / "converted"
    result = run_cli(
        "adapter", "convert", str(adapter), str(converted), "--to", "mlx", "--model", str(demo_kit.model)
    )
    assert result.exit_code == 0, result.stderr
    assert validate_adapter(converted, demo_kit.model).ok
    expected = _peft_merged_logits(demo_kit.model, adapter, shape.config)
    got = _mlx_lm_logits(demo_kit.model, converted)
    assert np.allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.array(got), np.array(_mlx_lm_logits(demo_kit.model, None)), atol=1e-3)
