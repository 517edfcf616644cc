"""Turn what a user typed (a local path or a Hugging Face id) into one canonical local model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.errors import ModelError, NotFoundError


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk: ``id`` is the canonical key (resolved path, or ``repo@revision``)."""

    id: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """A local directory wins; else a Hugging Face id found in the local cache (never downloaded)."""
    if not spec or not spec.strip():
        raise ModelError("No model given", "pass --model with a local model directory or a Hugging Face id")
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelError(
                f"Model path {spec} is a file, not a model directory", "pass the folder holding config.json"
            )
        if not (local / "config.json").is_file():
            raise ModelError(
                f"{spec} has no config.json, so it is not a model directory", "pass the model's folder"
            )
        return ResolvedModel(id=str(local.resolve()), path=local.resolve())
    if "@" in spec and revision is None:
        # The pool's own ids for cached Hub models are ``repo@revision``: accept them back.
        spec, revision = spec.split("@", 1)
    if not _looks_like_repo_id(spec):
        raise NotFoundError(
            f"Model path {spec} does not exist", "check the path, or pass a Hugging Face id (org/name)"
        )
    path = _from_hf_cache(spec, revision)
    if path is None:
        raise NotFoundError(
            f"Model {spec} is not a local directory and is not in the Hugging Face cache",
            f"download it first with `huggingface-cli download {spec}`, or pass a local path",
        )
    rev = path.name
    return ResolvedModel(id=f"{spec}@{rev}", path=path, repo_id=spec, revision=rev)


def _from_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None
    path = Path(found)
    return path if (path / "config.json").is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict, with a clear error when it is not one."""
    file = path / "config.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path} has no config.json", "pass a model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"Cannot read {file}: {exc}", "fix or re-download the model") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} is not a JSON object", "fix or re-download the model")
    return data


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards mlx-lm would load (``model*.safetensors``)."""
    return sorted(path.glob("model*.safetensors"))
