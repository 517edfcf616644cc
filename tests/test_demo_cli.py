"""``mlxman demo``: one base answering with each demo adapter, then the pool, on the cached kit."""

from __future__ import annotations

import json

import pytest

from mlxman.demo import DemoKit
from tests.helpers import run_cli


@pytest.fixture
def kit_home(demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch) -> DemoKit:
    """Point the user directory at the session's kit so the demo reuses it instead of rebuilding."""
    monkeypatch.setenv("MLXMAN_HOME", str(demo_kit.root.parents[1]))
    return demo_kit


def test_demo_json(kit_home: DemoKit) -> None:
    result = run_cli("demo", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    answers = {a["adapter"]: a for a in data["answers"]}
    assert answers[None]["base_was_resident"] is False
    for name, path in kit_home.adapters.items():
        answer = answers[str(path)]
        assert answer["base_was_resident"] is True
        assert answer["text"].startswith(kit_home.answers[name])
    entries = data["pool"]["entries"]
    assert len(entries) == 1 + len(kit_home.adapters)
    base = next(e for e in entries if e["parent"] is None)
    # Exact to the byte in a fresh process (test_pool_pool); here earlier tests share the process's counters.
    assert abs(base["measured_bytes"] - base["estimated_bytes"]) <= base["estimated_bytes"] // 100


def test_demo_table(kit_home: DemoKit) -> None:
    result = run_cli("demo")
    assert result.exit_code == 0, result.stderr
    for name, answer in kit_home.answers.items():
        assert name in result.stdout and answer in result.stdout
    assert "Used" in result.stdout and "free" in result.stdout
