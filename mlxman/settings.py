"""User-visible defaults, the user directory and the config file, in one place."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.errors import ConfigError
from mlxman.files import MISSING, SETTINGS_MAX_BYTES, FileProblem, path_problem, read_bounded

HOME_ENV = "MLXMAN_HOME"
MEMORY_LIMIT_ENV = "MLXMAN_MEMORY_LIMIT"
HOST_ENV = "MLXMAN_HOST"
# The environment variable `mlxman serve` reads its API key from (another name with --api-key-env).
API_KEY_ENV = "MLXMAN_API_KEY"
DEBUG_ENV = "MLXMAN_DEBUG"
CONFIG_FILENAME = "config.toml"

# Like Metal's recommended working set on Apple silicon: leave a quarter of RAM to the system.
DEFAULT_MEMORY_LIMIT = "75%"
DEFAULT_KEEP_ALIVE = "5m"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435
DEFAULT_MAX_TOKENS = 256
DEFAULT_CONTEXT_TOKENS = 4096
DEFAULT_MAX_MODELS = 8

CONFIG_KEYS = {"memory_limit", "keep_alive", "host", "port", "context_tokens", "max_models"}


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


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
