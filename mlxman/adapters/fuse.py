"""Fuse an adapter into a new model directory with mlx-lm's own fuse machinery, after validating it."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.adapters.validate import validate_adapter
from mlxman.errors import AdapterError, UsageError
from mlxman.models.resolve import resolve_model


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not empty", "pick a new folder for the fused model")
    resolved = resolve_model(model)
    report = validate_adapter(adapter, resolved.path)
    if not report.ok:
        raise AdapterError(f"Cannot fuse:\n{report.summary()}", "fix the adapter or pick its base model")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fusing-", dir=out.parent))
    try:
        source = adapter
        if report.format == "peft":
            from mlxman.adapters.convert import convert_adapter

            source = staging / "converted-adapter"
            convert_adapter(adapter, source, "mlx", model=resolved.path)
        elif report.format != "mlx":
            raise AdapterError(f"Cannot fuse a {report.format} adapter", "fuse mlx-lm or PEFT adapters")
        fused = _fuse(resolved.path, source, staging / "model", dequantize)
        if out.exists():
            out.rmdir()
        os.replace(staging / "model", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return FuseResult(
        resolved.id, adapter.resolve(), out.resolve(), fused, dequantize, report.format == "peft"
    )


def _fuse(model_path: Path, adapter: Path, out: Path, dequantize: bool) -> int:
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

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
