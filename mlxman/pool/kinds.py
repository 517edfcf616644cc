"""Which package runs a model (text: mlx-lm, vision: mlx-vlm, embeddings: mlx-embeddings), from its files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxman.errors import AdapterError, UsageError

TEXT = "text"
VISION = "vision"
EMBEDDINGS = "embeddings"
KINDS = (TEXT, VISION, EMBEDDINGS)

# Encoder families that only make sense as embedding models.
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "modernbert", "nomic_bert", "e5", "mpnet"}
_VISION_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")


def detect_kind(model_dir: Path, config: dict[str, Any]) -> str:
    """Guess the kind from config.json and side files; ``model_type`` alone is ambiguous, so it comes last."""
    if (model_dir / "modules.json").is_file() or (model_dir / "1_Pooling").is_dir():
        return EMBEDDINGS
    architectures = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    model_type = str(config.get("model_type", "")).lower()
    if any(a.endswith("ForMaskedLM") for a in architectures) or model_type in _ENCODER_TYPES:
        return EMBEDDINGS
    if "vision_config" in config or any(a.endswith("ForConditionalGeneration") for a in architectures):
        return VISION
    if any((model_dir / name).is_file() for name in _VISION_FILES):
        return VISION
    if architectures and all(a.endswith("Model") for a in architectures):
        return EMBEDDINGS
    return TEXT


def resolve_kind(model_dir: Path, config: dict[str, Any], override: str | None) -> str:
    if override is None:
        return detect_kind(model_dir, config)
    if override not in KINDS:
        raise UsageError(f"Unknown model kind {override!r}", f"use one of: {', '.join(KINDS)}")
    return override


def check_adapter_allowed(kind: str, model_id: str) -> None:
    """Embedding models cannot take adapters: mlx-embeddings would silently ignore one."""
    if kind == EMBEDDINGS:
        raise AdapterError(
            f"Model '{model_id}' is an embeddings model, and embeddings models cannot take adapters",
            "drop the adapter, or pass --kind text if the model is really a text generator",
        )
