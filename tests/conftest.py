"""Shared fixtures: an isolated user directory per test and the demo kit built once per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A missing local model path must never turn into a Hub download in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mlxman.demo import DemoKit, ensure_demo_kit

# Set to reuse one kit across test runs on a developer machine; CI builds a fresh one per session.
KIT_HOME_ENV = "MLXMAN_TEST_KIT_HOME"


@pytest.fixture(scope="session")
def demo_kit(tmp_path_factory: pytest.TempPathFactory) -> DemoKit:
    home = os.environ.get(KIT_HOME_ENV)
    root = Path(home) if home else tmp_path_factory.mktemp("kit-home")
    return ensure_demo_kit(root)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test gets its own MLXMAN_HOME and no inherited mlxman settings."""
    home = tmp_path / "mlxman-home"
    home.mkdir()
    monkeypatch.setenv("MLXMAN_HOME", str(home))
    for name in ("MLXMAN_MEMORY_LIMIT", "MLXMAN_DEBUG", "MLXMAN_HOST", "MLXMAN_MODEL_DIRS"):
        monkeypatch.delenv(name, raising=False)
    yield home


@pytest.fixture(scope="session")
def endless_model(demo_kit: DemoKit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo text model with no end-of-sequence token it can emit, so generation runs to max_tokens."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("endless") / "model"
    shutil.copytree(demo_kit.model, out)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        tok_config = json.loads((out / name).read_text())
        tok_config.pop("eos_token", None)
        (out / name).write_text(json.dumps(tok_config))
    config = json.loads((out / "config.json").read_text())
    config["eos_token_id"] = config["vocab_size"] + 1  # outside the vocabulary: never sampled
    (out / "config.json").write_text(json.dumps(config))
    return out
