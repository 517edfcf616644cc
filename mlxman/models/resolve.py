"""Turn what a user typed (a local path or a Hugging Face id) into one canonical local model directory."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.errors import ModelError, NotFoundError
from mlxman.files import (
    CONFIG_MAX_BYTES,
    MISSING,
    FileProblem,
    exists,
    path_problem,
    read_bounded,
    read_json_object,
    shown_path,
    too_long,
)
from mlxman.library.aliases import errors_about, lookup, model_only

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# A revision of 7 to 39 lowercase hex digits may be a commit's short hash (git's shortest is 7).
_SHORT_COMMIT = re.compile(r"[0-9a-f]{7,39}")
_FULL_COMMIT = re.compile(r"[0-9a-f]{40}")
REF_MAX_BYTES = 1024


@dataclass(frozen=True)
class ResolvedModel:
    """A model on local disk: ``id`` is the canonical key (resolved path, or ``repo@revision``)."""

    id: str
    path: Path
    repo_id: str | None = None
    revision: str | None = None


def looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """A name (``mlxman alias``) first; else a local directory; else a Hugging Face id found in the local
    cache (never downloaded)."""
    alias = lookup(spec) if revision is None else None
    if alias is not None:
        model_only(alias)
        with errors_about(alias):
            return _resolve_spec(alias.model, None)
    return _resolve_spec(spec, revision)


def _resolve_spec(spec: str, revision: str | None) -> ResolvedModel:
    if not spec or not spec.strip():
        raise ModelError("No model given", "pass --model with a local model directory or a Hugging Face id")
    local = Path(spec).expanduser()
    problem = path_problem(local, want_dir=True)
    if problem is None:
        return _local_model(spec, local)
    if too_long(problem):  # no such path can exist: a malformed name, not a missing model
        raise ModelError(f"Model path {shown_path(spec)} {problem}", "check the path")
    if problem != MISSING:  # something is there, but not a folder: say what it is
        words = problem.replace("not a folder", "not a model directory")
        raise ModelError(f"Model path {spec} {words}", "pass the folder holding config.json")
    if "@" in spec and revision is None:
        # The pool's own ids for cached Hub models are ``repo@revision``: accept them back.
        spec, revision = spec.split("@", 1)
    if not looks_like_repo_id(spec):
        if "/" not in spec and "\\" not in spec:  # a bare word: most likely a name the user meant
            raise NotFoundError(
                f"No name, model folder or Hugging Face id {spec!r}",
                "see `mlxman alias ls` and `mlxman ls`, or pass a folder or a Hugging Face id (org/name)",
            )
        raise NotFoundError(
            f"Model path {spec} does not exist", "check the path, or pass a Hugging Face id (org/name)"
        )
    path = _from_hf_cache(spec, revision)
    if path is None:
        _not_a_model_but_an_adapter(spec, revision)
        wanted = f"{spec}@{revision}" if revision else spec
        raise NotFoundError(
            f"Model {spec} is not a local directory and is not in the Hugging Face cache",
            f"fetch it first with `mlxman pull {wanted}`, or pass a local path",
        )
    rev = path.name
    return ResolvedModel(id=f"{spec}@{rev}", path=path, repo_id=spec, revision=rev)


def _local_model(spec: str, local: Path) -> ResolvedModel:
    config = local / CONFIG_FILE
    problem = path_problem(config)
    if problem == MISSING:
        raise ModelError(
            f"{spec} has no {CONFIG_FILE}, so it is not a model directory", "pass the model's folder"
        )
    if problem is not None:
        raise ModelError(f"Model {spec}: {CONFIG_FILE} {problem}", "replace it with the model's real file")
    path = local.resolve()
    return ResolvedModel(id=str(path), path=path)


def _from_cache_layout(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot a ref (or a full commit) names, read by the cache's documented layout: the common case
    without importing huggingface_hub's download client (its HTTP stack), which `alias ls` and the server's
    name lookups would otherwise pay for."""
    snapshot = _cached_snapshot(cache, repo_id, revision)
    return snapshot if snapshot is not None and exists(snapshot / CONFIG_FILE) else None


def _cached_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    revision = revision or "main"
    if ".." in revision.split("/") or revision.startswith("/"):
        return None
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = revision
    if not _FULL_COMMIT.fullmatch(revision):
        try:
            commit = read_bounded(folder / "refs" / revision, REF_MAX_BYTES, "a cache ref").decode().strip()
        except (FileProblem, UnicodeDecodeError):
            commit = _short_commit(folder, revision) or ""
        if not _FULL_COMMIT.fullmatch(commit):
            return None
    snapshot = folder / "snapshots" / commit
    return snapshot if exists(snapshot) else None


def cached_adapter(spec: str) -> Path | None:
    """The snapshot of a cached adapter repo named ``ORG/NAME[@REVISION]`` (as `ls` lists it), else None."""
    from huggingface_hub import constants

    repo_id, _, revision = spec.partition("@")
    if not looks_like_repo_id(repo_id):
        return None
    snapshot = _cached_snapshot(Path(constants.HF_HUB_CACHE), repo_id, revision or None)
    return snapshot if snapshot is not None and exists(snapshot / ADAPTER_CONFIG_FILE) else None


def _not_a_model_but_an_adapter(repo_id: str, revision: str | None) -> None:
    """ModelError when the cache holds ``repo_id`` as an adapter repo (`mlxman pull` fetches those too)."""
    snapshot = cached_adapter(f"{repo_id}@{revision}" if revision else repo_id)
    if snapshot is None:
        return
    try:
        config = read_json_object(snapshot / ADAPTER_CONFIG_FILE, CONFIG_MAX_BYTES, "an adapter config")
    except (FileProblem, ValueError):
        config = {}
    base = config.get("model") or config.get("base_model_name_or_path")
    model = base if isinstance(base, str) and base else "its base model"
    raise ModelError(
        f"{repo_id} is an adapter (in the Hugging Face cache), not a model",
        f"pass --model {model} --adapter {repo_id}",
    )


def _short_commit(folder: Path, revision: str) -> str | None:
    """The one cached commit a short hash starts (huggingface_hub takes full hashes only; `pull` and `rm`
    take short ones)."""
    if not _SHORT_COMMIT.fullmatch(revision):
        return None
    try:
        commits = [p.name for p in (folder / "snapshots").iterdir() if p.name.startswith(revision)]
    except OSError:
        return None
    return commits[0] if len(commits) == 1 else None


def _from_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    cached = _from_cache_layout(cache, repo_id, revision)
    if cached is not None or not (cache / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return cached  # a repo never cached: nothing for huggingface_hub to find either
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision is not None:
        revision = _short_commit(cache / ("models--" + repo_id.replace("/", "--")), revision) or revision
    try:
        found = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as exc:
        # IncompleteSnapshotError (it carries the folder): files the cached file list names are absent, as a
        # download by pattern (mlx-lm's, `mlxman pull`) leaves out READMEs and foreign weights. Whether what
        # a loader needs is there is checked where it loads.
        incomplete = getattr(exc, "snapshot_path", None)
        if not isinstance(incomplete, str):
            return None
        found = incomplete
    except (FileNotFoundError, ValueError, OSError):
        return None
    path = Path(found)
    return path if exists(path / CONFIG_FILE) else None


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json as a dict, with a clear error when it is not one."""
    file = path / CONFIG_FILE
    try:
        return read_json_object(file, CONFIG_MAX_BYTES, "a model config")
    except FileProblem as exc:
        if exc.problem == MISSING:
            raise ModelError(f"{path} has no {CONFIG_FILE}", "pass a model directory") from None
        raise ModelError(f"Model {path}: {exc}", "replace it with the model's real file") from None
    except ValueError as exc:
        raise ModelError(f"Model {path}: {CONFIG_FILE} {exc}", "fix or re-download the model") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards mlx-lm would load (``model*.safetensors``)."""
    return sorted(path.glob("model*.safetensors"))
