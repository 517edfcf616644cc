"""Adapters: validate, describe, convert (PEFT <-> mlx-lm) and fuse LoRA/DoRA adapters."""
