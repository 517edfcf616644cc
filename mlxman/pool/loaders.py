"""Load a model with the package that runs its kind: mlx-lm (text), mlx-vlm (vision), mlx-embeddings."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman import files
from mlxman.errors import AdapterError, MlxmanError, ModelError
from mlxman.models.preflight import check_loader_files
from mlxman.pool.kinds import EMBEDDINGS, TEXT, VISION, check_adapter_allowed


@dataclass(eq=False)
class LoadedModel:
    """A model in memory: the module and its tokenizer (mlx-lm TokenizerWrapper, or a vision processor)."""

    model: Any
    tokenizer: Any
    kind: str


def load_model(path: Path, kind: str, adapter_path: Path | None = None) -> LoadedModel:
    """Load ``path`` as ``kind``; ``adapter_path`` is baked in (full fine-tunes, vision adapters)."""
    if not files.exists(path / "config.json"):
        # mlx-lm would take a missing path for a Hugging Face id and try to download it.
        raise ModelError(f"{path} has no config.json", "pass a local model directory")
    if adapter_path is not None:
        check_adapter_allowed(kind, str(path))
    # mlx-lm, mlx-vlm and transformers open the folder's files themselves: check each one first.
    check_loader_files(path, adapter_path)
    try:
        if kind == TEXT:
            from mlx_lm import load

            from mlxman.pool.layout import column_major_linears

            model, tokenizer = load(str(path), adapter_path=str(adapter_path) if adapter_path else None)[:2]
            # On the CPU, float32 matmuls run ~2x faster with the weights column-major (layout.py).
            column_major_linears(model)
        elif kind == VISION:
            model, tokenizer = _load_vision(path, adapter_path)
        elif kind == EMBEDDINGS:
            model, tokenizer = _load_embeddings(path)
        else:
            raise ModelError(f"Unknown model kind {kind!r}", "use text, vision or embeddings")
    except MlxmanError:
        raise
    except Exception as exc:
        # The loaders raise whatever their parsers do (the tokenizers library a bare Exception for a
        # tokenizer.json nested past its limit); each is about the files they were handed.
        what = f"{path} with adapter {adapter_path}" if adapter_path else str(path)
        err = AdapterError if adapter_path is not None and "adapter" in str(exc).lower() else ModelError
        why = (
            "a JSON file is nested too deeply" if isinstance(exc, RecursionError) else f"{type(exc).__name__}"
        )
        raise err(
            f"Cannot load {kind} model {what}: {why}: {exc}",
            "check the model (and adapter) files, or pass --kind if the kind was guessed wrong",
        ) from None
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind)


def import_loader(kind: str) -> None:
    """Import the package for ``kind`` before a load: its import-time arrays are not the model's."""
    import importlib

    package = {TEXT: "mlx_lm", VISION: "mlx_vlm", EMBEDDINGS: "mlx_embeddings"}.get(kind)
    if package is None:
        return
    # A missing package is reported by load_model, with the install hint.
    with contextlib.suppress(ImportError):
        importlib.import_module(package)


def _load_vision(path: Path, adapter_path: Path | None) -> tuple[Any, Any]:
    try:
        from mlx_vlm import load  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        raise ModelError(
            f"{path} is a vision model and mlx-vlm is not installed",
            "install it with `pip install 'mlxman[vision]'`",
        ) from None
    model, processor = load(str(path), adapter_path=str(adapter_path) if adapter_path else None)
    return model, processor


def _load_embeddings(path: Path) -> tuple[Any, Any]:
    try:
        from mlx_embeddings import load
    except ImportError:
        raise ModelError(
            f"{path} is an embeddings model and mlx-embeddings is not installed",
            "install it with `pip install 'mlxman[embeddings]'`",
        ) from None
    model, tokenizer = load(str(path))
    return model, tokenizer
