"""The pool's context length and model count: flag, environment, config file, default; and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxman.answers import open_pool
from mlxman.errors import ConfigError, UsageError
from mlxman.settings import (
    DEFAULT_CONTEXT_TOKENS,
    DEFAULT_MAX_MODELS,
    Config,
    load_config,
    resolve_pool_limits,
)
from tests.helpers import run_cli


def config(tmp_path: Path, **values: object) -> Config:
    return Config(path=tmp_path / "config.toml", exists=True, values=values)


def test_precedence(tmp_path: Path) -> None:
    cfg = config(tmp_path, context_length=2048, max_models=4)
    env = {"MLXMAN_CONTEXT_LENGTH": "8192", "MLXMAN_MAX_MODELS": "2"}
    flag = resolve_pool_limits(16384, 1, cfg, env)
    assert (flag.context_tokens, flag.context_source, flag.max_models, flag.max_models_source) == (
        16384,
        "--context-length",
        1,
        "--max-models",
    )
    from_env = resolve_pool_limits(None, None, cfg, env)
    assert (from_env.context_tokens, from_env.max_models) == (8192, 2)
    assert from_env.context_source == "MLXMAN_CONTEXT_LENGTH"
    from_config = resolve_pool_limits(None, None, cfg, {})
    assert (from_config.context_tokens, from_config.max_models) == (2048, 4)
    assert from_config.context_source.startswith("context_length in ")
    default = resolve_pool_limits(None, None, Config(tmp_path / "none", exists=False), {})
    assert (default.context_tokens, default.max_models) == (DEFAULT_CONTEXT_TOKENS, DEFAULT_MAX_MODELS)
    assert default.context_source == default.max_models_source == "default"
    # The key config.toml accepted before, still read.
    assert resolve_pool_limits(None, None, config(tmp_path, context_tokens=1000), {}).context_tokens == 1000


@pytest.mark.parametrize(
    ("flag", "env", "values", "error", "named"),
    [
        (0, {}, {}, UsageError, "--context-length"),
        (None, {"MLXMAN_CONTEXT_LENGTH": "4k"}, {}, UsageError, "MLXMAN_CONTEXT_LENGTH"),
        (None, {}, {"context_length": "lots"}, ConfigError, "context_length in"),
        (None, {}, {"context_length": True}, ConfigError, "context_length in"),
        (None, {}, {"context_tokens": 2**40}, ConfigError, "context_tokens in"),
        (None, {}, {"context_length": 1, "context_tokens": 1}, ConfigError, "both"),
    ],
)
def test_bad_context(
    tmp_path: Path, flag: int | None, env: dict[str, str], values: dict[str, object], error: type, named: str
) -> None:
    with pytest.raises(error) as info:
        resolve_pool_limits(flag, None, config(tmp_path, **values), env)
    assert named in info.value.message and info.value.hint


@pytest.mark.parametrize(
    ("flag", "env", "values", "named"),
    [
        (0, {}, {}, "--max-models"),
        (None, {"MLXMAN_MAX_MODELS": "-1"}, {}, "MLXMAN_MAX_MODELS"),
        (None, {}, {"max_models": 1.5}, "max_models in"),
        (None, {}, {"max_models": 10**6}, "max_models in"),
    ],
)
def test_bad_max_models(
    tmp_path: Path, flag: int | None, env: dict[str, str], values: dict[str, object], named: str
) -> None:
    with pytest.raises(UsageError) as info:
        resolve_pool_limits(None, flag, config(tmp_path, **values), env)
    assert named in info.value.message and "from 1 to" in str(info.value.hint)


def test_commands_that_build_a_pool_take_both(isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated_home / "config.toml").write_text("context_length = 2048\nmax_models = 5\n")
    assert load_config().get("context_length") == 2048
    with open_pool(None) as pool:
        assert (pool.context_tokens, pool.max_models) == (2048, 5)
    with open_pool(None, 512, 1) as pool:
        assert (pool.context_tokens, pool.max_models) == (512, 1)
    monkeypatch.setenv("MLXMAN_MAX_MODELS", "2")
    with open_pool(None) as pool:
        assert pool.max_models == 2
    assert "--max-models" in run_cli("demo", "--help").stdout  # demo builds its kit first: not run here
    for command in (["generate", "--model", "m", "--prompt", "p"], ["serve"]):
        bad = run_cli(*command, "--context-length", "0")
        assert bad.exit_code == 2, (command, bad.stderr)
        assert "Invalid context length 0 (from --context-length)" in bad.stderr
        assert "Traceback" not in bad.stderr
    bad = run_cli("generate", "--model", "m", "--prompt", "p", "--max-models", "0")
    assert bad.exit_code == 2 and "Invalid model count 0 (from --max-models)" in bad.stderr
