"""``mlxman adapter convert``: PEFT <-> mlx-lm, checked by the logits mlx-lm computes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxman.adapters.validate import validate_adapter
from mlxman.demo import DemoKit
from tests.helpers import run_cli

TOKENS = [[1, 5, 9, 12, 7, 3, 30, 2]]


def _logits(model_dir: Path, adapter: Path | None) -> Any:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    out = model(mx.array(TOKENS))
    mx.eval(out)
    return out


def test_round_trip_mlx_peft_mlx_is_bit_identical(demo_kit: DemoKit, tmp_path: Path) -> None:
    import mlx.core as mx

    src = demo_kit.adapters["colors"]
    peft, back = tmp_path / "peft", tmp_path / "back"
    r1 = run_cli("adapter", "convert", str(src), str(peft), "--to", "peft")
    assert r1.exit_code == 0, r1.stderr
    config = json.loads((peft / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (peft / "adapter_model.safetensors").is_file()
    report = validate_adapter(peft, demo_kit.model)
    assert report.ok and report.format == "peft", report.summary()
    r2 = run_cli("adapter", "convert", str(peft), str(back), "--to", "mlx", "--json")
    assert r2.exit_code == 0, r2.stderr
    assert validate_adapter(back, demo_kit.model).findings == []
    original, converted = _logits(demo_kit.model, src), _logits(demo_kit.model, back)
    assert bool(mx.array_equal(original, converted))
    assert not bool(mx.array_equal(original, _logits(demo_kit.model, None)))


def _base_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _write_peft(folder: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


PEFT_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": 8,
    "lora_alpha": 16,
    "use_rslora": True,
    "rank_pattern": {"v_proj": 4},
    "alpha_pattern": {"model.layers.1.self_attn.q_proj": 48},
    "target_modules": ["q_proj", "v_proj", "down_proj"],
    "lora_dropout": 0.0,
    "bias": "none",
    "base_model_name_or_path": "someone/tiny-llama",
}


def _peft_tensors(base: dict[str, np.ndarray], config: dict[str, Any]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in (0, 1):
        for key in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            module = f"model.layers.{layer}.{key}"
            out_dims, in_dims = base[f"{module}.weight"].shape
            r = 4 if key.endswith("v_proj") else 8
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(0, 0.3, (r, in_dims)).astype(
                np.float32
            )
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, 0.3, (out_dims, r)).astype(
                np.float32
            )
    return tensors


def test_peft_patterns_and_rslora_convert_to_the_same_logits(demo_kit: DemoKit, tmp_path: Path) -> None:
    """rank_pattern, alpha_pattern and rsLoRA folded into one mlx-lm scale: PEFT math, W x + B A x s."""
    import mlx.core as mx
    from mlx_lm import load

    base = _base_weights(demo_kit.model)
    tensors = _peft_tensors(base, PEFT_CONFIG)
    peft = _write_peft(tmp_path / "peft", PEFT_CONFIG, tensors)
    report = validate_adapter(peft, demo_kit.model)
    assert report.ok, report.summary()
    assert any("someone/tiny-llama" in w.message for w in report.warnings)
    result = run_cli("adapter", "convert", str(peft), str(tmp_path / "mlx"), "--to", "mlx", "--model",
                     str(demo_kit.model), "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["folded_modules"] > 0
    assert validate_adapter(tmp_path / "mlx", demo_kit.model).errors == []
    converted = _logits(demo_kit.model, tmp_path / "mlx")

    # PEFT's math by hand: merge every module's B A * alpha / sqrt(r) into the base weight.
    merged = []
    for name, a in tensors.items():
        if not name.endswith("lora_A.weight"):
            continue
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = tensors[name.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = 48 if module == "model.layers.1.self_attn.q_proj" else 16
        w = base[f"{module}.weight"].astype(np.float64) + (b.astype(np.float64) @ a) * alpha / math.sqrt(r)
        merged.append((f"{module}.weight", mx.array(w.astype(np.float32))))
    model, _ = load(str(demo_kit.model))
    model.load_weights(merged, strict=False)
    expected = model(mx.array(TOKENS))
    assert np.allclose(np.array(converted), np.array(expected), rtol=1e-3, atol=1e-3)
    assert not np.allclose(np.array(converted), np.array(_logits(demo_kit.model, None)), atol=1e-3)


@pytest.mark.parametrize(
    ("change", "culprit"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "biases"),
    ],
)
def test_unfaithful_peft_conversions_are_refused(
    demo_kit: DemoKit, tmp_path: Path, change: dict[str, Any], culprit: str
) -> None:
    base = _base_weights(demo_kit.model)
    config = {**PEFT_CONFIG, **change}
    peft = _write_peft(tmp_path / "peft", config, _peft_tensors(base, config))
    result = run_cli("adapter", "convert", str(peft), str(tmp_path / "out"), "--to", "mlx", "--model",
                     str(demo_kit.model))  # fmt: skip
    assert result.exit_code == 1
    assert culprit in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_pickle_bin_and_dora_to_peft_are_refused(demo_kit: DemoKit, tmp_path: Path) -> None:
    peft = tmp_path / "bin"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    (peft / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    result = run_cli("adapter", "convert", str(peft), str(tmp_path / "out"), "--to", "mlx")
    assert result.exit_code == 1 and "pickle" in result.stderr
    dora = run_cli(
        "adapter", "convert", str(demo_kit.adapters["animals"]), str(tmp_path / "d"), "--to", "peft"
    )
    assert dora.exit_code == 1 and "dora" in dora.stderr


def test_peft_rank_pattern_mismatch_is_found(demo_kit: DemoKit, tmp_path: Path) -> None:
    base = _base_weights(demo_kit.model)
    config = {**PEFT_CONFIG, "rank_pattern": {}}
    peft = _write_peft(tmp_path / "peft", config, _peft_tensors(base, PEFT_CONFIG))
    report = validate_adapter(peft, demo_kit.model)
    assert not report.ok and any("v_proj" in e.where and "rank 4" in e.message for e in report.errors)


def test_convert_usage_errors(demo_kit: DemoKit, tmp_path: Path) -> None:
    src = str(demo_kit.adapters["colors"])
    assert run_cli("adapter", "convert", src, str(tmp_path / "x"), "--to", "gguf").exit_code == 2
    assert run_cli("adapter", "convert", src, str(tmp_path / "x"), "--to", "mlx").exit_code == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert run_cli("adapter", "convert", src, str(tmp_path / "full"), "--to", "peft").exit_code == 2
