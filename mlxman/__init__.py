"""mlxman: run, pool and check MLX models and LoRA adapters on one machine's memory."""

__version__ = "0.1.0"
