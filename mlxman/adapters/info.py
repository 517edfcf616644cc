"""What an adapter is: format, type, rank, scale, coverage, size, and the base and training it records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.adapters.base import layers_and_targets
from mlxman.adapters.config import check_config, read_adapter_config
from mlxman.adapters.findings import AdapterFormat, ValidationReport
from mlxman.adapters.formats import detect_format, weights_file
from mlxman.errors import AdapterError
from mlxman.safetensors_header import HeaderError, read_header

# Config keys that describe the adapter itself; every other key is a training setting.
ADAPTER_KEYS = {
    "fine_tune_type",
    "num_layers",
    "lora_parameters",
    "model",
    "adapter_path",
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "base_model_name_or_path",
    "rank",
    "alpha",
    "dropout",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "modules_to_save",
    "bias",
}


@dataclass
class AdapterInfo:
    path: Path
    format: AdapterFormat
    fine_tune_type: str
    rank: int | None
    scale: float | None
    alpha: float | None
    num_layers: int | None
    layers: list[int]
    target_modules: list[str]
    parameters: int
    bytes: int
    dtypes: list[str]
    base_model: str | None
    weights_file: str
    training: dict[str, Any] = field(default_factory=dict)


def _module_path(tensor: str) -> str:
    """``base_model.model.x.lora_A.weight`` or ``x.lora_a`` -> ``x``."""
    module = tensor.removeprefix("base_model.model.")
    for leaf in (".lora_A.weight", ".lora_B.weight", ".lora_a", ".lora_b", ".m", ".A", ".B", ".weight"):
        module = module.removesuffix(leaf)
    return module


def adapter_info(adapter_dir: str | Path) -> AdapterInfo:
    """Describe an adapter from its config and header; AdapterError when either cannot be read."""
    path = Path(adapter_dir)
    config = read_adapter_config(path)
    files = set(os.listdir(path))
    fmt = detect_format(config, files)
    settings = check_config(config, fmt, ValidationReport(adapter_dir=path))
    wfile = weights_file(fmt, files)
    try:
        header = read_header(path / wfile)
    except HeaderError as exc:
        raise AdapterError(f"Adapter {path}: {exc}", "run `mlxman adapter validate` on it") from None
    layers, targets = layers_and_targets(_module_path(name) for name in header.tensors)
    scale = settings.scale
    if fmt == "peft" and settings.rank and settings.alpha is not None:
        scale = settings.alpha / (settings.rank**0.5 if settings.use_rslora else settings.rank)
    training = {k: v for k, v in config.items() if k not in ADAPTER_KEYS and v is not None}
    return AdapterInfo(
        path=path.resolve(),
        format=fmt,
        fine_tune_type=settings.fine_tune_type,
        rank=settings.rank,
        scale=scale,
        alpha=settings.alpha,
        num_layers=settings.num_layers,
        layers=sorted(layers),
        target_modules=sorted(settings.keys or targets) if fmt == "mlx" else sorted(targets),
        parameters=sum(t.numel for t in header.tensors.values()),
        bytes=header.data_bytes,
        dtypes=sorted({t.dtype for t in header.tensors.values()}),
        base_model=settings.base_model,
        weights_file=wfile,
        training=training,
    )
