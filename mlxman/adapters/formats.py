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


# Keys only mlx-lm writes (its own loader reads them) and keys that mark a Hugging Face PEFT config.
MLX_KEYS = ("lora_parameters", "fine_tune_type", "num_layers")
PEFT_KEYS = ("peft_type", "r", "lora_alpha", "target_modules")


def detect_format(config: dict[str, Any] | None, files: set[str]) -> AdapterFormat:
    """Tell the format from the weight file present and the keys each format's own loader reads.

    Training scripts copy every argument they got into the config, so an mlx-lm adapter may also carry
    PEFT-like keys (``lora_rank``, ``lora_alpha``, ``target_modules``): mlx-lm's own keys and its weight
    file win over those.
    """
    mlx_file = MLX_WEIGHTS in files
    peft_file = PEFT_WEIGHTS in files or PEFT_PICKLE in files
    if config is not None:
        mlx_keys = any(k in config for k in MLX_KEYS)
        if "base_quantization" in config:
            return "mlx-vlm"
        if mlx_keys and (mlx_file or not peft_file):
            return _mlx_or_vlm(config)
        if any(k in config for k in PEFT_KEYS):
            return "peft"
        if mlx_keys:
            return _mlx_or_vlm(config)
        # mlx-vlm's legacy format: {rank, alpha, dropout} at the top level.
        if "rank" in config and "alpha" in config:
            return "mlx-vlm"
    if mlx_file:
        return "mlx"
    if peft_file:
        return "peft"
    if VLM_WEIGHTS in files:
        return "mlx-vlm"
    return "unknown"


def _mlx_or_vlm(config: dict[str, Any]) -> AdapterFormat:
    """mlx-vlm adapters use mlx-lm's keys but name modules from the model's root (``language_model.``)."""
    params = config.get("lora_parameters")
    keys = params.get("keys") if isinstance(params, dict) else None
    if isinstance(keys, list) and any(isinstance(k, str) and k.startswith(VLM_PREFIXES) for k in keys):
        return "mlx-vlm"
    return "mlx"


def weights_file(fmt: AdapterFormat, files: set[str]) -> str:
    """The weight file a loader of this format would open."""
    if fmt == "peft":
        return PEFT_WEIGHTS
    if fmt == "mlx-vlm" and MLX_WEIGHTS not in files and VLM_WEIGHTS in files:
        return VLM_WEIGHTS
    return MLX_WEIGHTS
