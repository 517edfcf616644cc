"""Fuse an adapter into a new model directory with mlx-lm's own fuse machinery, after validating it."""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.adapters.validate import validate_adapter
from mlxman.errors import AdapterError
from mlxman.models.preflight import check_loader_files
from mlxman.models.resolve import resolve_model
from mlxman.staging import check_destination, write_folder

STAGING_PREFIX = ".fusing-"


@dataclass(frozen=True)
class FuseResult:
    model: str
    adapter: Path
    output: Path
    fused_modules: int
    dequantized: bool
    converted_from_peft: bool


def fuse_adapter(model: str, adapter: str | Path, out: str | Path, dequantize: bool = False) -> FuseResult:
    """Write base + adapter as one model to ``out`` (a new folder); refuse an adapter that does not fit."""
    adapter, out = Path(adapter), Path(out)
    resolved = resolve_model(model)
    out = check_destination(out, [("adapter", adapter), ("base model", resolved.path)], force=False)
    report = validate_adapter(adapter, resolved.path)
    if not report.ok:
        raise AdapterError(f"Cannot fuse:\n{report.summary()}", "fix the adapter or pick its base model")
    if report.format not in ("mlx", "peft"):
        raise AdapterError(f"Cannot fuse a {report.format} adapter", "fuse mlx-lm or PEFT adapters")

    def build(staging: Path) -> int:
        source = adapter
        converted = staging / ".converted-adapter"
        if report.format == "peft":
            from mlxman.adapters.convert import convert_adapter

            source = convert_adapter(adapter, converted, "mlx", model=resolved.path).destination
        fused = _fuse(resolved.path, source, staging, dequantize)
        shutil.rmtree(converted, ignore_errors=True)
        return fused

    fused = write_folder(out, build, prefix=STAGING_PREFIX)
    return FuseResult(
        resolved.id, adapter.resolve(), out.resolve(), fused, dequantize, report.format == "peft"
    )


def _fuse(model_path: Path, adapter: Path, out: Path, dequantize: bool) -> int:
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

    check_loader_files(model_path, adapter)  # mlx-lm opens every file itself: no FIFO, device or huge file
    loaded: Any = load(str(model_path), adapter_path=str(adapter), return_config=True)
    model, tokenizer, config = loaded
    fused = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    # save() prints nothing today but writes a README model card; keep stdout for data.
    with contextlib.redirect_stdout(io.StringIO()):
        save(out, str(model_path), model, tokenizer, config, donate_model=False)
    return len(fused)
