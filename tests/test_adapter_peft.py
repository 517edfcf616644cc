"""The ``peft`` library itself loads what ``adapter convert --to peft`` writes, and computes mlx-lm's logits.

peft needs torch, which the `dev` extra leaves out (see docs/adapters.md): these tests skip without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlxman.demo import DemoKit
from tests.adapter_corpus import MLX_SHAPES, write_mlx_shape
from tests.helpers import run_cli

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

TOKENS = [[1, 5, 9, 12, 7, 3, 30, 2]]


def _mlx_logits(base: Path, adapter: Path | None) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=str(adapter) if adapter else None)
    out = model(mx.array(TOKENS))
    mx.eval(out)
    return np.array(out)


def _torch_base(model_dir: Path) -> Any:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


def _torch_logits(model: Any) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("name", ["colors", "numbers", "mlx_lm_last_blocks_only"])
def test_peft_loads_every_converted_tensor_and_matches_mlx(
    demo_kit: DemoKit, tmp_path: Path, name: str
) -> None:
    """The kit's adapters (every block) and a real-world shape adapting the last block only."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    if name in demo_kit.adapters:
        adapter = demo_kit.adapters[name]
    else:
        shape = next(s for s in MLX_SHAPES if s.name == name)
        adapter = write_mlx_shape(shape, demo_kit.model, tmp_path / name)
    out = tmp_path / "peft"
    result = run_cli("adapter", "convert", str(adapter), str(out), "--to", "peft")
    assert result.exit_code == 0, result.stderr
    base = _torch_base(demo_kit.model)
    # The same base in both frameworks first, so that a difference below is the adapter's.
    plain = _torch_logits(base)
    assert np.allclose(plain, _mlx_logits(demo_kit.model, None), atol=1e-4)
    model = PeftModel.from_pretrained(base, str(out)).eval()  # wraps ``base`` in place
    saved = load_file(str(out / "adapter_model.safetensors"))
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert sorted(loaded) == sorted(saved)  # no tensor missing, none unexpected
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved)
    config = json.loads((out / "adapter_config.json").read_text())
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert len(wrapped) == len(saved) // 2 == (7 if config["layers_to_transform"] == [1] else 14), config
    got, want = _torch_logits(model), _mlx_logits(demo_kit.model, adapter)
    assert np.allclose(got, want, atol=1e-4), np.abs(got - want).max()
    assert not np.allclose(got, plain, atol=1e-3)
