"""Bytes a load will take, read from safetensors headers and config.json before any weight is touched."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.errors import AdapterError, ModelError
from mlxman.models.resolve import weight_files
from mlxman.pool.keys import ADAPTER_WEIGHTS
from mlxman.pool.kinds import EMBEDDINGS
from mlxman.safetensors_header import DTYPE_BYTES, HeaderError, SafetensorsHeader, read_header

# mlx-lm grows its KV cache in steps of this many tokens.
KV_CACHE_STEP = 256
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
_CONFIG_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Config keys that bound a model's positions, checked in this order (the first one set wins).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


@dataclass(frozen=True)
class ModelFootprint:
    """What a base model takes: its weights, plus KV-cache headroom for the configured context."""

    weights_bytes: int
    kv_bytes: int
    kv_bytes_per_token: int
    activation_dtype_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


def model_headers(model_dir: Path) -> list[SafetensorsHeader]:
    files = weight_files(model_dir)
    if not files:
        raise ModelError(
            f"{model_dir} has no model*.safetensors weights", "pass a directory holding an MLX model"
        )
    try:
        return [read_header(f) for f in files]
    except HeaderError as exc:
        raise ModelError(
            f"Cannot read the weights of {model_dir}: {exc}", "re-download or rebuild the model"
        ) from None


def activation_dtype_bytes(headers: list[SafetensorsHeader], config: dict[str, Any]) -> int:
    """Bytes per activation: the float dtype holding most weight bytes (quantized models: their scales)."""
    by_dtype: Counter[str] = Counter()
    for header in headers:
        for tensor in header.tensors.values():
            if tensor.dtype in _FLOAT_DTYPES:
                by_dtype[tensor.dtype] += tensor.nbytes
    if by_dtype:
        return DTYPE_BYTES[by_dtype.most_common(1)[0][0]]
    return _CONFIG_DTYPE_BYTES.get(str(config.get("torch_dtype", "")), 2)


def _int(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """2 (keys and values) * layers * kv_heads * head_dim * bytes; 0 when the config does not say."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    cfg = {**config, **text} if text else config
    layers = _int(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(cfg, "num_attention_heads", "n_head")
    kv_heads = _int(cfg, "num_key_value_heads") or heads
    hidden = _int(cfg, "hidden_size", "n_embd", "d_model")
    head_dim = _int(cfg, "head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return 0
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def model_context(config: dict[str, Any], context_tokens: int) -> int:
    """The context a model is admitted with: ``context_tokens``, or fewer when its config allows fewer.

    Like Ollama, which caps num_ctx at the model's trained context. RoPE scaling (a ``factor`` over the
    original positions) extends that bound.
    """
    text = config.get("text_config")
    cfg = {**config, **text} if isinstance(text, dict) else config
    bounds = [v for v in (cfg.get(k) for k in _CONTEXT_KEYS) if isinstance(v, int) and _positive(v)]
    if not bounds:
        return context_tokens
    bound = bounds[0]
    scaling = cfg.get("rope_scaling")
    scaling = scaling if isinstance(scaling, dict) else {}
    factor, original = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if isinstance(factor, (int, float)) and factor > 1:
        start = original if isinstance(original, int) and _positive(original) else bound
        bound = max(bound, int(start * factor))
    return min(context_tokens, bound)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def kv_cache_bytes(per_token: int, context_tokens: int) -> int:
    steps = math.ceil(max(context_tokens, 0) / KV_CACHE_STEP)
    return per_token * steps * KV_CACHE_STEP


def model_footprint(
    model_dir: Path, config: dict[str, Any], kind: str, context_tokens: int
) -> ModelFootprint:
    headers = model_headers(model_dir)
    weights = sum(h.data_bytes for h in headers)
    dtype_bytes = activation_dtype_bytes(headers, config)
    # Embedding models encode in one pass and keep no cache between calls.
    per_token = 0 if kind == EMBEDDINGS else kv_bytes_per_token(config, dtype_bytes)
    return ModelFootprint(
        weights_bytes=weights,
        kv_bytes=kv_cache_bytes(per_token, context_tokens),
        kv_bytes_per_token=per_token,
        activation_dtype_bytes=dtype_bytes,
    )


def adapter_bytes(adapter_dir: Path) -> int:
    """The adapter's own bytes once loaded: the sum of its tensors."""
    try:
        return read_header(adapter_dir / ADAPTER_WEIGHTS).data_bytes
    except HeaderError as exc:
        raise AdapterError(
            f"Cannot read the weights of adapter {adapter_dir}: {exc}", "retrain or re-download the adapter"
        ) from None
