"""Shared by the engine tests: a third LoRA adapter unlike the kit's, and mlx-lm's own serial answers."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import mlx.core as mx


def small_variant(source: Path, out: Path, *, rank: int, scale: float) -> Path:
    """A third LoRA adapter unlike the kit's: lower rank, q/v projections only, and only in layer 0."""
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config["lora_parameters"] = {
        **config["lora_parameters"],
        "rank": rank,
        "scale": scale,
        "keys": ["self_attn.q_proj", "self_attn.v_proj"],
    }
    config["adapter_path"] = str(out)
    (out / "adapter_config.json").write_text(json.dumps(config))
    weights = mx.load(str(source / "adapters.safetensors"))
    assert isinstance(weights, dict)
    kept = {}
    for name, w in weights.items():
        if not name.startswith(("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")):
            continue
        # Reversed and truncated, so it is not the source adapter at a lower rank.
        kept[name] = w[:, ::-1][:, :rank] if name.endswith("lora_a") else w[::-1][:rank]
    mx.save_safetensors(str(out / "adapters.safetensors"), kept)
    return out


@cache
def _loaded(model_dir: Path, adapter: Path | None) -> tuple[Any, Any]:
    from mlx_lm import load

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)[:2]
    return model, tokenizer


def serial_answer(model_dir: Path, adapter: Path | None, tokens: list[int], max_tokens: int) -> str:
    """Greedy text of one request alone: ``mlx_lm.load(model, adapter_path=...)``, then mlx-lm's generate."""
    from mlx_lm import generate

    model, tokenizer = _loaded(model_dir, adapter)
    return str(generate(model, tokenizer, tokens, max_tokens=max_tokens))
