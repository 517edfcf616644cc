"""The adapter formats mlxman knows, their file names, and how to tell them apart from the files alone."""

from __future__ import annotations

from typing import Any

from mlxman.adapters.findings import AdapterFormat

CONFIG_FILE = "adapter_config.json"
MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
VLM_WEIGHTS = "weights.safetensors"
PEFT_PREFIX = "base_model.model."
# mlx-vlm keeps the language model under this prefix and names adapter modules from the model's root.
VLM_PREFIXES = ("language_model.", "vision_tower.", "vision_model.", "audio_tower.")
FINE_TUNE_TYPES = ("lora", "dora", "full")
FORMAT_NAMES: dict[str, str] = {
    "mlx": "mlx-lm",
    "peft": "Hugging Face PEFT",
    "mlx-vlm": "mlx-vlm",
    "unknown": "unknown",
}


def detect_format(config: dict[str, Any] | None, files: set[str]) -> AdapterFormat:
    """Guess the format from the config's keys, then from which weight file is present."""
    if config is not None:
        if "peft_type" in config or "lora_alpha" in config or "target_modules" in config:
            return "peft"
        if "base_quantization" in config:
            return "mlx-vlm"
        if "lora_parameters" in config or "fine_tune_type" in config or "num_layers" in config:
            params = config.get("lora_parameters")
            keys = params.get("keys") if isinstance(params, dict) else None
            if isinstance(keys, list) and any(
                isinstance(k, str) and k.startswith(VLM_PREFIXES) for k in keys
            ):
                return "mlx-vlm"
            return "mlx"
        # mlx-vlm's legacy format: {rank, alpha, dropout} at the top level.
        if "rank" in config and "alpha" in config:
            return "mlx-vlm"
    if MLX_WEIGHTS in files:
        return "mlx"
    if PEFT_WEIGHTS in files or PEFT_PICKLE in files:
        return "peft"
    if VLM_WEIGHTS in files:
        return "mlx-vlm"
    return "unknown"


def weights_file(fmt: AdapterFormat, files: set[str]) -> str:
    """The weight file a loader of this format would open."""
    if fmt == "peft":
        return PEFT_WEIGHTS
    if fmt == "mlx-vlm" and MLX_WEIGHTS not in files and VLM_WEIGHTS in files:
        return VLM_WEIGHTS
    return MLX_WEIGHTS
