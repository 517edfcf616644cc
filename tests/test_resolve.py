"""Model resolution: local directories, cached Hugging Face ids (repo and repo@revision), and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxman.errors import ModelError, NotFoundError
from mlxman.models.resolve import resolve_model


def fake_hub_cache(root: Path, repo: str, revision: str) -> Path:
    """The Hugging Face cache layout for one snapshot, as huggingface-cli download leaves it."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return snapshot


def test_local_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_model(str(tmp_path))
    assert resolved.path == tmp_path.resolve() and resolved.id == str(tmp_path.resolve())


def test_cached_hub_id_and_its_pool_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    revision = "a" * 40
    import huggingface_hub.constants

    # The constant is read when huggingface_hub is imported, which another test may have done already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = fake_hub_cache(tmp_path, "org/tiny", revision)
    resolved = resolve_model("org/tiny")
    assert resolved.path == snapshot and resolved.id == f"org/tiny@{revision}"
    assert resolve_model(resolved.id).path == snapshot


@pytest.mark.parametrize(
    ("spec", "error", "needle"),
    [
        ("", ModelError, "No model given"),
        ("./missing-dir", NotFoundError, "does not exist"),
        ("org/not-cached", NotFoundError, "huggingface-cli download org/not-cached"),
    ],
)
def test_errors(spec: str, error: type[Exception], needle: str) -> None:
    with pytest.raises(error) as info:
        resolve_model(spec)
    assert needle in str(info.value)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))
