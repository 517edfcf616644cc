"""What an adapter needs to know about a base model, read from config.json and safetensors headers alone."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.models.resolve import read_config, weight_files
from mlxman.safetensors_header import HeaderError, TensorInfo, read_header

LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
DEFAULT_GROUP_SIZE = 64


@dataclass(frozen=True)
class BaseModule:
    """A weight-bearing module of the base: the dims a LoRA must match (unpacked for quantized weights)."""

    path: str
    in_dims: int
    out_dims: int
    experts: int | None = None
    bits: int | None = None
    dtype: str = "F32"


@dataclass
class BaseModel:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    modules: dict[str, BaseModule] = field(default_factory=dict)
    num_blocks: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def float_dtype(self) -> str | None:
        """The dtype most float weights (or quantization scales) use."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in ("F32", "F16", "BF16"):
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        return max(counts, key=lambda k: counts[k]) if counts else None

    def has_block_module(self, layer: int, prefix: str, key: str) -> bool:
        return f"{prefix}.{layer}.{key}" in self.modules


def split_layer(path: str) -> tuple[str, int, str] | None:
    """``model.layers.3.self_attn.q_proj`` -> ("model.layers", 3, "self_attn.q_proj")."""
    m = LAYER_RE.match(path)
    if not m:
        return None
    return m["prefix"], int(m["index"]), m["rest"]


def layers_and_targets(modules: Iterable[str]) -> tuple[set[int], set[str]]:
    """Block indices the adapter's modules sit in, and their paths in a block (top-level paths as is)."""
    layers: set[int] = set()
    targets: set[str] = set()
    for module in modules:
        split = split_layer(module)
        if split:
            layers.add(split[1])
            targets.add(split[2])
        else:
            targets.add(module)
    return layers, targets


def _block_count(config: dict[str, Any]) -> int | None:
    for cfg in (config, config.get("text_config"), config.get("language_config")):
        if isinstance(cfg, dict):
            for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                value = cfg.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def _quant_params(config: dict[str, Any], module: str) -> tuple[int | None, int]:
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict):
        return None, DEFAULT_GROUP_SIZE
    own = quant.get(module)
    src = own if isinstance(own, dict) else quant
    bits, group = src.get("bits"), src.get("group_size", DEFAULT_GROUP_SIZE)
    return (bits if isinstance(bits, int) and bits > 0 else None), (
        group if isinstance(group, int) and group > 0 else 64
    )


def is_embedding(path: str) -> bool:
    return "embed" in path.rsplit(".", 1)[-1] or path.endswith(".wte")


def read_base(path: Path) -> BaseModel:
    """Headers of every weight shard and the module dims derived from them; problems listed, never raised."""
    base = BaseModel(path=path, config=read_config(path))
    files = weight_files(path)
    if not files:
        base.problems.append(f"{path} has no model*.safetensors weights")
    for file in files:
        try:
            base.tensors.update(read_header(file).tensors)
        except HeaderError as exc:
            base.problems.append(str(exc))
    t = base.tensors
    for name, info in t.items():
        if not name.endswith(".weight") or len(info.shape) not in (2, 3):
            continue
        module = name[: -len(".weight")]
        *experts, rows, cols = info.shape
        bits = None
        scales = t.get(f"{module}.scales")
        if scales is not None and info.dtype == "U32":
            bits, group = _quant_params(base.config, module)
            if bits is None and scales.shape:
                bits = cols * 32 // max(1, scales.shape[-1] * group)
            cols = cols * 32 // bits if bits else cols
        dtype = scales.dtype if scales is not None else info.dtype
        if is_embedding(module) and not experts:
            in_dims, out_dims = rows, cols
        else:
            in_dims, out_dims = cols, rows
        base.modules[module] = BaseModule(
            module, in_dims, out_dims, experts[0] if experts else None, bits, dtype
        )
    indices = {s[1] for s in map(split_layer, base.modules) if s}
    base.num_blocks = _block_count(base.config) or (max(indices) + 1 if indices else 0)
    return base
