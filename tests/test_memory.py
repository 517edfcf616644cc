"""Memory sizes and the budget resolution."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlxman.errors import UsageError
from mlxman.memory import format_bytes, parse_size, resolve_budget
from mlxman.settings import Config

GiB = 1024**3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8_000_000_000),
        ("8gb", 8_000_000_000),
        ("8G", 8 * GiB),
        ("8GiB", 8 * GiB),
        ("512MiB", 512 * 1024**2),
        ("512 MB", 512_000_000),
        ("1.5G", int(1.5 * GiB)),
        ("100", 100),
        ("100B", 100),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("75%", 75 * GiB // 100),
        ("100%", 1 * GiB),
    ],
)
def test_parse_size_good(text: str, expected: int) -> None:
    assert parse_size(text, total_bytes=GiB) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "8XB", "-1GB", "0", "0%", "150%", "ten GB", "1e3GB", "8 G B", "nan", "inf", "0.1B"]
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text, total_bytes=GiB)
    assert "Invalid memory size" in info.value.message
    assert info.value.hint and "8GB" in info.value.hint


def test_percentage_needs_total() -> None:
    with pytest.raises(UsageError):
        parse_size("50%")


@given(st.text(max_size=30))
def test_parse_size_never_crashes(text: str) -> None:
    with contextlib.suppress(UsageError):
        assert parse_size(text, total_bytes=GiB) >= 1


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * GiB) == "3.0 GiB"
    assert format_bytes(None) == "-"


def test_budget_precedence(tmp_path: Path) -> None:
    config = Config(path=tmp_path / "config.toml", exists=True, values={"memory_limit": "2GB"})
    empty = Config(path=tmp_path / "config.toml", exists=False)
    env = {"MLXMAN_MEMORY_LIMIT": "3GB"}
    assert resolve_budget("1GB", config, GiB * 10, env).source == "--memory-limit"
    assert resolve_budget(None, config, GiB * 10, env).limit_bytes == 3_000_000_000
    assert resolve_budget(None, config, GiB * 10, {}).limit_bytes == 2_000_000_000
    default = resolve_budget(None, empty, GiB * 10, {})
    assert (default.source, default.limit_bytes) == ("default", int(GiB * 10 * 0.75))
    with pytest.raises(UsageError) as info:
        resolve_budget(None, Config(tmp_path, True, {"memory_limit": "much"}), GiB, {})
    assert "config file" in info.value.message


def test_total_memory_is_psutils() -> None:
    from mlxman.memory import system_memory, total_memory

    assert total_memory() == system_memory().total
