"""The server's pure parts, without a model: path roots, API key, stop sequences, addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxman.client import Address, parse_address, server_address
from mlxman.errors import NotFoundError, UsageError
from mlxman.server.jobs import StopMatcher
from mlxman.server.security import (
    AccessDenied,
    PathPolicy,
    Unauthorized,
    check_bearer,
    is_loopback,
    split_key,
)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    (root / "adapters" / "a").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "inner-link").symlink_to(root / "adapters" / "a", target_is_directory=True)
    return {"root": root, "outside": outside}


def test_paths_under_the_root_resolve(tree: dict[str, Path]) -> None:
    root = tree["root"]
    policy = PathPolicy([root])
    ref = policy.resolve(f"{root}/model::adapters/a", loaded=set())
    assert ref.model == str(root.resolve() / "model") and ref.adapter == str(
        root.resolve() / "adapters" / "a"
    )
    assert policy.resolve("model::inner-link", set()).adapter == str(root.resolve() / "adapters" / "a")


@pytest.mark.parametrize(
    "spec",
    [
        "{outside}",
        "model::{outside}",
        "model::../outside",
        "model::{root}/../outside",
        "model::link",
        "{root}/link",
    ],
)
def test_paths_leaving_the_root_are_denied(tree: dict[str, Path], spec: str) -> None:
    policy = PathPolicy([tree["root"]])
    with pytest.raises(AccessDenied):
        policy.resolve(spec.format(**tree), loaded=set())


def test_missing_path_under_the_root_is_not_found(tree: dict[str, Path]) -> None:
    with pytest.raises(NotFoundError):
        PathPolicy([tree["root"]]).resolve("model::adapters/missing", loaded=set())


def test_without_roots_only_loaded_entries(tree: dict[str, Path]) -> None:
    model = str(tree["root"].resolve() / "model")
    adapter = str(tree["root"].resolve() / "adapters" / "a")
    policy = PathPolicy()
    loaded = {model, f"{model}::{adapter}"}
    assert policy.resolve(f"{model}::{adapter}", loaded).key == f"{model}::{adapter}"
    assert policy.resolve(model, loaded).adapter is None
    with pytest.raises(AccessDenied, match="not loaded"):
        policy.resolve(f"{model}::{tree['outside']}", loaded)
    with pytest.raises(AccessDenied):
        policy.resolve(str(tree["outside"]), loaded)


@pytest.mark.parametrize("spec", ["::a", "m::", "a::b::c"])
def test_malformed_keys(spec: str) -> None:
    with pytest.raises(UsageError):
        split_key(spec)


def test_bearer() -> None:
    check_bearer(None, None)
    check_bearer("Bearer k3y", "k3y")
    check_bearer("bearer k3y", "k3y")
    for header in (None, "", "Bearer", "Bearer nope", "Basic k3y", "k3y"):
        with pytest.raises(Unauthorized):
            check_bearer(header, "k3y")


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_stop_matcher_holds_back_partial_matches() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc E") == ("abc ", False)
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("x") == ("ENx", False)
    assert matcher.feed("yE") == ("y", False)
    assert matcher.feed("ND more") == ("", True)
    plain = StopMatcher([])
    assert plain.feed("END") == ("END", False)
    tail = StopMatcher(["xyz"])
    assert tail.feed("abx") == ("ab", False) and tail.flush() == "x"


def test_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_address("10.0.0.2:8080") == Address("10.0.0.2", 8080)
    assert parse_address("http://example.local") == Address("example.local", 11435)
    assert parse_address(":9000") == Address("127.0.0.1", 9000)
    assert parse_address("[::1]:9000").url == "http://[::1]:9000"
    for bad in ("", "https://x:1", "host:notaport", "host:70000"):
        with pytest.raises(UsageError):
            parse_address(bad)
    assert server_address() == Address("127.0.0.1", 11435)
    monkeypatch.setenv("MLXMAN_HOST", "127.0.0.1:1234")
    assert server_address().port == 1234
    assert server_address("127.0.0.1:99").port == 99
