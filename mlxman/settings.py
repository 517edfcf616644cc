"""User-visible defaults, the user directory and the config file, in one place."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.errors import ConfigError, UsageError
from mlxman.files import MISSING, SETTINGS_MAX_BYTES, FileProblem, path_problem, read_bounded

HOME_ENV = "MLXMAN_HOME"
MEMORY_LIMIT_ENV = "MLXMAN_MEMORY_LIMIT"
CONTEXT_ENV = "MLXMAN_CONTEXT_LENGTH"
MAX_MODELS_ENV = "MLXMAN_MAX_MODELS"
HOST_ENV = "MLXMAN_HOST"
# The environment variable `mlxman serve` reads its API key from (another name with --api-key-env).
API_KEY_ENV = "MLXMAN_API_KEY"
DEBUG_ENV = "MLXMAN_DEBUG"
# Folders `mlxman ls` lists models and adapters from (os.pathsep-separated); replaces config model_dirs.
MODEL_DIRS_ENV = "MLXMAN_MODEL_DIRS"
CONFIG_FILENAME = "config.toml"

# Like Metal's recommended working set on Apple silicon: leave a quarter of RAM to the system.
DEFAULT_MEMORY_LIMIT = "75%"
DEFAULT_KEEP_ALIVE = "5m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435
DEFAULT_MAX_TOKENS = 256
# Tokens (prompt plus generated) each model gets KV-cache room for, like Ollama's num_ctx; a model whose
# config declares a shorter context gets its own.
DEFAULT_CONTEXT_TOKENS = 4096
MAX_CONTEXT_TOKENS = 1 << 24
DEFAULT_MAX_MODELS = 8
MAX_MAX_MODELS = 1024
# Seconds a load waits for requests in flight to release memory before it is refused.
DEFAULT_ADMISSION_TIMEOUT = 60.0
# The serving engine (``serve``): LoRA slots per base and their largest rank (vLLM's --max-loras 8 and
# --max-lora-rank 16), rows decoded together (mlx-lm's server: 32) and requests waiting per base.
DEFAULT_ADAPTER_SLOTS = 8
DEFAULT_MAX_LORA_RANK = 16
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_QUEUE = 256

# `context_tokens` is the older name of `context_length`, still read.
CONFIG_KEYS = {
    "memory_limit",
    "keep_alive",
    "host",
    "port",
    "context_length",
    "context_tokens",
    "max_models",
    "model_dirs",
}


def user_dir() -> Path:
    """The one directory for caches, the demo kit and config: ``$MLXMAN_HOME`` or the platform default."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().resolve()
    from platformdirs import user_data_path

    return user_data_path("mlxman", appauthor=False)


def config_path() -> Path:
    return user_dir() / CONFIG_FILENAME


@dataclass(frozen=True)
class Config:
    """Settings read from ``config.toml`` in the user directory (all optional)."""

    path: Path
    exists: bool
    values: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values.get(key)


def load_config(path: Path | None = None) -> Config:
    """Read the config file; a missing file is an empty config, a broken one a ConfigError."""
    path = path or config_path()
    if path_problem(path) == MISSING:
        return Config(path=path, exists=False)
    import tomllib  # only when there is a file: `mlxman --help` reads none

    try:
        values = tomllib.loads(
            read_bounded(path, SETTINGS_MAX_BYTES, "a config file", allow_empty=True).decode()
        )
    except FileProblem as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}", "fix or delete the file") from None
    except RecursionError:
        raise ConfigError(
            f"Cannot read config file {path}: it is nested too deeply", "fix the file"
        ) from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc}", "fix or delete the file") from exc
    unknown = sorted(set(values) - CONFIG_KEYS)
    if unknown:
        raise ConfigError(
            f"Unknown key(s) in {path}: {', '.join(unknown)}",
            f"use only: {', '.join(sorted(CONFIG_KEYS))}",
        )
    return Config(path=path, exists=True, values=values)


@dataclass(frozen=True)
class PoolLimits:
    """The context each model is admitted with and the most models a pool holds, with where each came from."""

    context_tokens: int
    context_source: str
    max_models: int
    max_models_source: str


def resolve_pool_limits(
    context_flag: int | None,
    max_models_flag: int | None,
    config: Config,
    env: Mapping[str, str] | None = None,
) -> PoolLimits:
    """Each from its flag, then its environment variable, then the config file, then the default."""
    env = os.environ if env is None else env
    old_key = config.get("context_tokens")
    if old_key is not None and config.get("context_length") is not None:
        raise ConfigError(
            f"{config.path} sets both context_length and context_tokens", "keep only context_length"
        )
    context, context_source = _setting(
        "context length",
        [
            (context_flag, "--context-length"),
            (env.get(CONTEXT_ENV) or None, CONTEXT_ENV),
            (config.get("context_length"), f"context_length in {config.path}"),
            (old_key, f"context_tokens in {config.path}"),
        ],
        DEFAULT_CONTEXT_TOKENS,
        MAX_CONTEXT_TOKENS,
        "a whole number of tokens, such as 4096 or 32768",
    )
    max_models, max_models_source = _setting(
        "model count",
        [
            (max_models_flag, "--max-models"),
            (env.get(MAX_MODELS_ENV) or None, MAX_MODELS_ENV),
            (config.get("max_models"), f"max_models in {config.path}"),
        ],
        DEFAULT_MAX_MODELS,
        MAX_MAX_MODELS,
        "a whole number of models, such as 2 or 8",
    )
    return PoolLimits(context, context_source, max_models, max_models_source)


def _setting(
    what: str, candidates: list[tuple[Any, str]], default: int, most: int, use: str
) -> tuple[int, str]:
    for value, source in candidates:
        if value is None:
            continue
        number: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and value.strip().isdigit():
            number = int(value.strip())
        if number is None or not 1 <= number <= most:
            error = ConfigError if source.startswith(("context", "max_models")) else UsageError
            raise error(f"Invalid {what} {value!r} (from {source})", f"use {use}, from 1 to {most:,}")
        return number, source
    return default, "default"


def model_dirs(config: Config, env: Mapping[str, str] | None = None) -> tuple[list[Path], str]:
    """The folders holding the user's models and adapters, and where that list came from:
    ``$MLXMAN_MODEL_DIRS``, else ``model_dirs`` in the config file, else none."""
    env = os.environ if env is None else env
    if env.get(MODEL_DIRS_ENV):
        parts = [p for p in env[MODEL_DIRS_ENV].split(os.pathsep) if p.strip()]
        return [Path(p).expanduser() for p in parts], MODEL_DIRS_ENV
    value = config.get("model_dirs")
    if value is None:
        return [], "default"
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(
            f"model_dirs in {config.path} is not a list of folders",
            'write it as model_dirs = ["~/models", "/data/adapters"]',
        )
    return [Path(v).expanduser() for v in value], f"model_dirs in {config.path}"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
