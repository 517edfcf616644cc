"""Fetch a model or adapter repo from the Hugging Face Hub into its cache (only what MLX loads); remove one.

huggingface_hub is imported inside these functions only: nothing else in mlxman pays for it.

What ``pull`` fetches, by name (the union of what mlx-lm, mlx-vlm and mlx-embeddings open when they load):
config and tokenizer JSON, safetensors weights, tokenizer vocabularies (``*.txt``, ``*.model``,
``*.tiktoken``, ``*.bpe``) and chat templates (``*.jinja``). Not fetched: ``*.py`` (mlxman never passes
``trust_remote_code``, so no loader runs it), pickled or foreign weights (``*.bin``, ``*.pth``, ``*.gguf``,
``*.onnx``, ...), Mistral's duplicate ``consolidated*.safetensors``, Meta's ``original/`` folder, README,
images and datasets.

Files are fetched one at a time, small ones first, each pinned to the commit the revision named when the
pull began. A dropped connection resumes inside a file (huggingface_hub asks for the rest with a ``Range``
request); an interrupted pull keeps every file it finished, and the next pull fetches only the rest
(huggingface_hub discards a partly written file when its download stops). The branch or tag is written to
the cache only once every file is there and checked, so ``mlxman generate -m ORG/NAME`` never finds half
a model.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlxman.errors import (
    AdapterError,
    Interrupted,
    InUseError,
    MlxmanError,
    ModelError,
    NotFoundError,
    ServerError,
    UsageError,
)
from mlxman.files import INDEX_MAX_BYTES, FileProblem, read_json_object
from mlxman.memory import format_bytes

RepoKind = Literal["model", "adapter"]

ALLOW_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.bpe",
    "*.jinja",
)
IGNORE_PATTERNS = ("consolidated*.safetensors", "original/*", ".*", "*/.*")
# Weights in formats MLX cannot load: a repo holding only these is not an MLX model.
FOREIGN_WEIGHTS = {
    ".bin": "PyTorch pickles",
    ".pt": "PyTorch pickles",
    ".pth": "PyTorch pickles",
    ".ckpt": "PyTorch checkpoints",
    ".gguf": "GGUF files (llama.cpp's format)",
    ".onnx": "ONNX graphs",
    ".h5": "Keras weights",
    ".msgpack": "Flax weights",
    ".pdparams": "PaddlePaddle weights",
}
MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapters.safetensors", "adapter_model.safetensors", "weights.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"
# Free space a pull leaves on the disk beyond what it fetches (the cache's own small files, other writers).
DISK_MARGIN = 64 * 1024 * 1024
# How often the progress of the file being written is read from disk.
PROGRESS_INTERVAL = 0.2
MLX_BUILDS = "https://huggingface.co/mlx-community"
# The Hub's own rule for a repo id (huggingface_hub's validate_repo_id): ORG/NAME of word characters, '-'
# and '.', at most 96 each, neither starting nor ending with '-' or '.', no '--' or '..', no '.git' end.
_REPO_PART = re.compile(r"[\w](?:[\w.-]{0,94}[\w])?")


@dataclass(frozen=True)
class RepoSpec:
    """``ORG/NAME[@REVISION]`` as typed; ``revision`` None means the default branch."""

    repo_id: str
    revision: str | None = None

    @property
    def text(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


@dataclass(frozen=True)
class PullPlan:
    """What a pull fetches: ``files`` at ``commit`` (what the revision named when the plan was made)."""

    repo_id: str
    revision: str | None
    commit: str
    kind: RepoKind
    files: tuple[RemoteFile, ...]
    skipped: tuple[str, ...]
    cached_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def to_fetch_bytes(self) -> int:
        return max(self.total_bytes - self.cached_bytes, 0)


@dataclass(frozen=True)
class PullResult:
    """A pulled and checked repo: ``id`` is what to pass as a model (or adapter) from now on."""

    id: str
    repo_id: str
    revision: str | None
    commit: str
    kind: RepoKind
    path: Path
    files: list[str]
    total_bytes: int
    downloaded_bytes: int
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# Called with (bytes done, bytes in all, the file being fetched or None).
ProgressFn = Callable[[int, int, "str | None"], None]


def parse_spec(text: str) -> RepoSpec:
    """``ORG/NAME`` or ``ORG/NAME@REVISION`` (a branch, tag or commit hash), checked as the Hub checks ids."""
    repo_id, at, revision = text.strip().partition("@")
    parts = repo_id.split("/")
    if (
        len(parts) != 2
        or not all(_REPO_PART.fullmatch(p) for p in parts)
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith(".git")
        or "@" in revision
        or (at and not revision)
    ):
        raise UsageError(
            f"{text!r} is not a Hugging Face repo id",
            "pass ORG/NAME or ORG/NAME@REVISION, as on huggingface.co (e.g. mlx-community/Qwen3-0.6B-4bit)",
        )
    return RepoSpec(repo_id, revision or None)


def cache_dir() -> Path:
    """The Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME``/hub), as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def plan_pull(spec: RepoSpec, *, endpoint: str | None = None, cache: Path | None = None) -> PullPlan:
    """Ask the Hub what the repo holds at the revision and choose the files MLX needs; nothing is fetched.

    Raises NotFoundError (no such repo or revision), ModelError (not an MLX model or adapter) or an
    MlxmanError naming the network, offline or access problem."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    with hub_errors(spec):
        info = HfApi(endpoint=endpoint).model_info(spec.repo_id, revision=spec.revision, files_metadata=True)
    if not info.sha:
        raise MlxmanError(
            f"The Hub did not say which commit {spec.text} is at", "check HF_ENDPOINT, then pull again"
        )
    remote = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    kind = _kind(spec, remote)
    chosen = sorted(
        (RemoteFile(name, size) for name, size in remote.items() if _wanted(name)),
        key=lambda f: (f.size, f.name),  # small first: configs are on disk before the weights start
    )
    cached = sum(
        f.size
        for f in chosen
        if isinstance(try_to_load_from_cache(spec.repo_id, f.name, cache_dir=cache, revision=info.sha), str)
    )
    return PullPlan(
        repo_id=spec.repo_id,
        revision=spec.revision,
        commit=info.sha,
        kind=kind,
        files=tuple(chosen),
        skipped=tuple(sorted(n for n in remote if not _wanted(n))),
        cached_bytes=cached,
    )


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in ALLOW_PATTERNS) and not any(
        fnmatch.fnmatch(name, p) for p in IGNORE_PATTERNS
    )


def _kind(spec: RepoSpec, remote: dict[str, int]) -> RepoKind:
    """A model (config.json) or an adapter (adapter_config.json); ModelError when MLX cannot load it."""
    names = set(remote)
    weights = {n for n in names if n.endswith(".safetensors") and _wanted(n)}
    foreign = sorted(n for n in names if Path(n).suffix.lower() in FOREIGN_WEIGHTS)
    if ADAPTER_CONFIG in names and not (MODEL_CONFIG in names and weights - set(ADAPTER_WEIGHTS)):
        if not weights & set(ADAPTER_WEIGHTS):
            if "adapter_model.bin" in names:
                raise AdapterError(
                    f"{spec.text} is a PEFT adapter with pickled weights only (adapter_model.bin), which "
                    "mlxman never unpickles (it can run arbitrary code)",
                    "ask for, or save, the adapter with safe_serialization=True (adapter_model.safetensors)",
                )
            raise AdapterError(
                f"{spec.text} has an adapter_config.json but no adapter weights "
                f"({', '.join(ADAPTER_WEIGHTS)})",
                "check the repo's files on huggingface.co",
            )
        return "adapter"
    if MODEL_CONFIG not in names:
        raise ModelError(
            f"{spec.text} has no config.json or adapter_config.json: it is not a model or adapter MLX loads",
            "check the repo's files on huggingface.co; datasets and spaces cannot be pulled",
        )
    if not weights:
        if foreign:
            kinds = sorted({FOREIGN_WEIGHTS[Path(n).suffix.lower()] for n in foreign})
            name = spec.repo_id.split("/")[1]
            raise ModelError(
                f"{spec.text} is not in MLX format: its weights are {' and '.join(kinds)} "
                f"({_listing(foreign)}), and MLX loads safetensors only",
                f"pull an MLX build of it (search {MLX_BUILDS} for {name}), or save it as safetensors with "
                "transformers and convert that folder with `mlx_lm.convert --hf-path FOLDER --mlx-path DIR`",
            )
        raise ModelError(
            f"{spec.text} has a config.json but no safetensors weights",
            "check the repo's files on huggingface.co",
        )
    return "model"


def _listing(names: list[str], shown: int = 3) -> str:
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def fetch(
    plan: PullPlan,
    progress: ProgressFn | None = None,
    *,
    endpoint: str | None = None,
    cache: Path | None = None,
) -> Path:
    """Download the plan's files into the cache, one at a time; return the snapshot folder.

    Files already cached cost no request. Interrupted (Ctrl-C) keeps every finished file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils.tqdm import disable_progress_bars

    root = (cache or cache_dir()).expanduser()
    repo_folder = root / repo_folder_name(repo_id=plan.repo_id, repo_type="model")
    _check_free_space(plan, root)
    # mlxman draws its own bar and says what failed; huggingface_hub's bars and retry warnings would
    # interleave with it (a dropped connection is resumed silently, and the bar shows it).
    disable_progress_bars()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    spec = RepoSpec(plan.repo_id, plan.revision)
    done = 0
    snapshot: Path | None = None
    with _watch(repo_folder / "blobs", plan.total_bytes, progress) as watcher:
        try:
            for i, item in enumerate(plan.files):
                watcher.at(done, f"{item.name} ({i + 1}/{len(plan.files)})")
                # huggingface_hub's HTTP errors are OSErrors too: name them first, then the disk's.
                with _disk_errors(plan, item, root), hub_errors(spec):
                    local = hf_hub_download(
                        plan.repo_id, item.name, revision=plan.commit, cache_dir=cache, endpoint=endpoint
                    )
                done += item.size
                snapshot = Path(local).parents[len(Path(item.name).parts) - 1]
            watcher.at(done, None)
        except KeyboardInterrupt:
            kept = sum(1 for f in plan.files if _cached(plan, f, cache))
            raise Interrupted(
                f"Interrupted; {kept} of {len(plan.files)} files of {spec.text} are in the cache",
                f"run `mlxman pull {spec.text}` again to fetch the rest",
            ) from None
    return snapshot or repo_folder / "snapshots" / plan.commit


def _cached(plan: PullPlan, item: RemoteFile, cache: Path | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(
        try_to_load_from_cache(plan.repo_id, item.name, cache_dir=cache, revision=plan.commit), str
    )


def _check_free_space(plan: PullPlan, root: Path) -> None:
    need = plan.to_fetch_bytes
    if need == 0:
        return
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: the download itself will say if the disk fills
    if free < need + DISK_MARGIN:
        raise MlxmanError(
            f"Not enough disk space to pull {_spec_text(plan)}: it needs {format_bytes(need)} and "
            f"{probe} has {format_bytes(free)} free",
            "free some space (`mlxman rm` removes a cached model), or point HF_HOME at a larger disk",
        )


def _spec_text(plan: PullPlan) -> str:
    return RepoSpec(plan.repo_id, plan.revision).text


@contextmanager
def _disk_errors(plan: PullPlan, item: RemoteFile, root: Path) -> Iterator[None]:
    """A full disk, a quota, or a file system that takes no file this large (FAT32 stops at 4 GiB)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MlxmanError(
                f"The disk filled up while pulling {_spec_text(plan)} into {root}",
                "free space (`mlxman rm` removes a cached model) and pull again: finished files are kept",
            ) from None
        if exc.errno == errno.EFBIG:
            raise MlxmanError(
                f"{root} cannot hold {item.name} of {_spec_text(plan)} ({format_bytes(item.size)}): the file "
                "is larger than its file system or the process's file size limit allows",
                "point HF_HOME at a disk that takes large files (not FAT32), or raise `ulimit -f`",
            ) from None
        if exc.errno is None:  # huggingface_hub's own: the bytes received are not the size announced
            text = str(exc).strip()
            reason = text.splitlines()[0].split(" (", 1)[0].rstrip(".") if text else "it broke off"
            raise MlxmanError(
                f"The download of {item.name} of {_spec_text(plan)} went wrong: {reason}",
                "pull again: finished files are kept",
            ) from None
        raise


class _Watcher:
    """Reports bytes done: finished files, plus the size of the file being written (read from disk)."""

    def __init__(self, blobs: Path, total: int, progress: ProgressFn | None) -> None:
        self.blobs, self.total, self.progress = blobs, total, progress
        self.done = 0
        self.current: str | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def at(self, done: int, current: str | None) -> None:
        with self.lock:
            self.done, self.current = done, current
        self.report()

    def report(self) -> None:
        if self.progress is None:
            return
        with self.lock:
            done, current = self.done, self.current
        partial = 0
        if current is not None:
            try:
                with os.scandir(self.blobs) as entries:
                    partial = sum(e.stat().st_size for e in entries if e.name.endswith(".incomplete"))
            except OSError:
                partial = 0
        self.progress(min(done + partial, self.total), self.total, current)

    def run(self) -> None:
        while not self.stop.wait(PROGRESS_INTERVAL):
            self.report()


@contextmanager
def _watch(blobs: Path, total: int, progress: ProgressFn | None) -> Iterator[_Watcher]:
    watcher = _Watcher(blobs, total, progress)
    thread = threading.Thread(target=watcher.run, name="mlxman-pull-progress", daemon=True)
    if progress is not None:
        thread.start()
    try:
        yield watcher
    finally:
        watcher.stop.set()
        if thread.is_alive():
            thread.join()


@contextmanager
def hub_errors(spec: RepoSpec) -> Iterator[None]:
    """huggingface_hub's exceptions (and its HTTP client's) as one-line mlxman errors with the next step."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    text = spec.text
    try:
        yield
    except GatedRepoError:
        raise MlxmanError(
            f"{spec.repo_id} is gated: its files need an accepted licence and a token",
            f"accept its terms on https://huggingface.co/{spec.repo_id}, log in with `hf auth login` "
            "(or set HF_TOKEN), then pull again",
        ) from None
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"{spec.repo_id} is not on the Hugging Face Hub, or it is private",
            "check the name on huggingface.co; if it is private, log in with `hf auth login` or set HF_TOKEN",
        ) from None
    except RevisionNotFoundError:
        raise NotFoundError(
            f"{spec.repo_id} has no revision {spec.revision!r}",
            f"pass a branch, tag or commit hash it has, or pull {spec.repo_id} for its default branch",
        ) from None
    except EntryNotFoundError:
        raise MlxmanError(
            f"A file the Hub listed for {text} is gone from it",
            f"pull {text} again: the repo changed meanwhile",
        ) from None
    except OfflineModeIsEnabled:
        raise _offline(text) from None
    except LocalEntryNotFoundError as exc:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise _offline(text) from None
        raise _unreachable(text, exc.__cause__ or exc) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise MlxmanError(
                f"The Hub refused access to {spec.repo_id} (HTTP {status})",
                "log in with `hf auth login` (or set HF_TOKEN) with a token that reads it, then pull again",
            ) from None
        raise _unreachable(text, exc) from None
    except _transport_errors() as exc:
        raise _unreachable(text, exc) from None


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network failures of the HTTP client huggingface_hub uses: httpx2 from 2.0, httpx before."""
    import importlib

    found: list[type[Exception]] = []
    for module in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _offline(text: str) -> MlxmanError:
    return MlxmanError(
        f"Pulling {text} needs the network, but HF_HUB_OFFLINE is set",
        "unset HF_HUB_OFFLINE, then pull again",
    )


def _unreachable(text: str, exc: BaseException) -> MlxmanError:
    from huggingface_hub import constants

    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MlxmanError(
        f"The Hugging Face Hub at {constants.ENDPOINT} did not answer for {text}: {reason}",
        "check the network (and HF_ENDPOINT if set), then pull again: finished files are kept",
    )


def check_pulled(plan: PullPlan, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Check the fetched folder as a loader would see it (config, every safetensors header, shards named by
    an index; an adapter through ``adapter validate``), before the pull says done. Returns what it read."""
    try:
        if plan.kind == "adapter":
            return _check_adapter(plan, path)
        return _check_model(plan, path), []
    except MlxmanError as exc:
        # Pulling again fetches the same bytes: the repo is what is broken, and the branch stays unrecorded.
        raise type(exc)(
            f"{_spec_text(plan)} was fetched but does not check out: {exc.message}",
            f"tell the repo's owner; `mlxman rm {plan.repo_id}` removes what was fetched",
        ) from None


def _check_model(plan: PullPlan, path: Path) -> dict[str, Any]:
    from mlxman.models.preflight import check_loader_files
    from mlxman.models.resolve import read_config
    from mlxman.safetensors_header import HeaderError, read_header

    config = read_config(path)
    check_loader_files(path)
    names = {f.name for f in plan.files}
    for index in sorted(n for n in names if n.endswith(INDEX_SUFFIX)):
        try:
            weight_map = read_json_object(path / index, INDEX_MAX_BYTES, "a weight index").get("weight_map")
        except (FileProblem, ValueError) as exc:
            raise ModelError(f"{index} {exc}") from None
        prefix = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
        shards = {prefix + s for s in weight_map.values()} if isinstance(weight_map, dict) else set()
        missing = sorted(s for s in shards if isinstance(s, str) and s not in names)
        if missing:
            raise ModelError(f"{index} names shards the repo does not have ({_listing(missing)})")
    tensors = 0
    weight_bytes = 0
    dtypes: dict[str, int] = {}
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            header = read_header(path / name)
        except HeaderError as exc:
            raise ModelError(str(exc)) from None
        tensors += len(header.tensors)
        weight_bytes += header.data_bytes
        for t in header.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.nbytes
    quant = config.get("quantization") or config.get("quantization_config")
    bits = quant.get("bits") if isinstance(quant, dict) else None
    archs = config.get("architectures")
    return {
        "model_type": config.get("model_type"),
        "architecture": archs[0] if isinstance(archs, list) and archs else None,
        "quantization": f"{bits}-bit" if isinstance(bits, int) else None,
        "dtype": max(dtypes, key=lambda k: dtypes[k]) if dtypes else None,
        "tensors": tensors,
        "weight_bytes": weight_bytes,
    }


def _check_adapter(plan: PullPlan, path: Path) -> tuple[dict[str, Any], list[str]]:
    from mlxman.adapters.config import read_adapter_config
    from mlxman.adapters.validate import validate_adapter

    config = read_adapter_config(path)
    base = config.get("model") or config.get("base_model_name_or_path")
    base_path = _local_base(base) if isinstance(base, str) else None
    report = validate_adapter(path, base_path)
    if not report.ok:
        raise AdapterError(report.summary())
    warnings = [f"{f.where}: {f.message}" + (f" ({f.hint})" if f.hint else "") for f in report.warnings]
    if isinstance(base, str) and base_path is None:
        hint = f"; pull it with `mlxman pull {base}`" if _is_repo_id(base) else ""
        warnings.append(f"its base model {base} is not on this machine, so the fit was not checked{hint}")
    return {
        "format": report.format,
        "fine_tune_type": report.fine_tune_type,
        "base_model": base if isinstance(base, str) else None,
        "checked_against": str(base_path) if base_path else None,
    }, warnings


def _is_repo_id(text: str) -> bool:
    try:
        parse_spec(text)
    except UsageError:
        return False
    return not text.startswith((".", "/", "~"))


def _local_base(base: str) -> Path | None:
    from mlxman.models.resolve import resolve_model

    try:
        return resolve_model(base).path
    except MlxmanError:
        return None


def pin_revision(plan: PullPlan, *, endpoint: str | None = None) -> str | None:
    """Record the branch or tag in the cache (``refs/``), now that its files are there; return a warning
    when it moved to another commit during the pull."""
    if plan.revision is not None and plan.commit.startswith(plan.revision):
        return None  # a commit hash (or its prefix): nothing to record
    from huggingface_hub import HfApi

    spec = RepoSpec(plan.repo_id, plan.revision)
    with hub_errors(spec):
        resolved = HfApi(endpoint=endpoint).resolve_revision(plan.repo_id, revision=plan.revision)
    if resolved.resolved != plan.commit:
        return (
            f"{spec.text} moved to commit {resolved.resolved[:12]} during the pull; this pull holds "
            f"{plan.commit[:12]}: pull again for the newer one"
        )
    return None


def pull(
    spec: RepoSpec,
    progress: ProgressFn | None = None,
    *,
    on_plan: Callable[[PullPlan], None] | None = None,
    endpoint: str | None = None,
    cache: Path | None = None,
) -> PullResult:
    """Plan, fetch, check, then record the revision: the whole ``mlxman pull``."""
    plan = plan_pull(spec, endpoint=endpoint, cache=cache)
    if on_plan is not None:
        on_plan(plan)
    path = fetch(plan, progress, endpoint=endpoint, cache=cache)
    details, warnings = check_pulled(plan, path)
    moved = pin_revision(plan, endpoint=endpoint)
    if moved:
        warnings.append(moved)
    by_commit = bool(moved) or (spec.revision is not None and plan.commit.startswith(spec.revision))
    return PullResult(
        # The cache finds a branch or tag by name, and a commit only by its full hash.
        id=f"{spec.repo_id}@{plan.commit}" if by_commit else spec.text,
        repo_id=spec.repo_id,
        revision=spec.revision,
        commit=plan.commit,
        kind=plan.kind,
        path=path,
        files=[f.name for f in plan.files],
        total_bytes=plan.total_bytes,
        downloaded_bytes=plan.to_fetch_bytes,
        details=details,
        warnings=warnings,
    )


# ---- rm ----


@dataclass(frozen=True)
class CachedRevision:
    commit: str
    refs: list[str]
    size_bytes: int
    path: Path


@dataclass(frozen=True)
class Removal:
    """What ``rm`` would delete (or deleted): revisions of one cached repo and the bytes that frees."""

    repo_id: str
    repo_path: Path
    revisions: list[CachedRevision]
    freed_bytes: int
    whole_repo: bool


def plan_removal(name: str, cache: Path | None = None) -> Removal:
    """``ORG/NAME`` (every cached revision) or ``ORG/NAME@REV`` (a branch, tag or commit-hash prefix)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from mlxman.library.aliases import lookup

    alias = lookup(name)
    if alias is not None:
        raise UsageError(
            f"{name!r} is a name for {alias.model}" + (f"::{alias.adapter}" if alias.adapter else ""),
            f"forget the name with `mlxman alias rm {name}`; remove the model with `mlxman rm {alias.model}`",
        )
    spec = parse_spec(name)
    missing = NotFoundError(
        f"{spec.text} is not in the Hugging Face cache", "`mlxman ls` lists what is there"
    )
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        raise missing from None
    repo = next((r for r in info.repos if r.repo_type == "model" and r.repo_id == spec.repo_id), None)
    if repo is None:
        raise missing
    revisions = [
        r
        for r in repo.revisions
        if spec.revision is None or spec.revision in r.refs or r.commit_hash.startswith(spec.revision)
    ]
    if not revisions:
        raise missing
    named = spec.revision is None or any(spec.revision in r.refs for r in revisions)
    if len(revisions) > 1 and not named:
        raise UsageError(
            f"{spec.revision!r} is the start of {len(revisions)} cached commits of {spec.repo_id}",
            "give more of the commit hash (`mlxman ls` shows the cached revisions)",
        )
    strategy = info.delete_revisions(*(r.commit_hash for r in revisions))
    return Removal(
        repo_id=repo.repo_id,
        repo_path=Path(repo.repo_path),
        revisions=[
            CachedRevision(r.commit_hash, sorted(r.refs), r.size_on_disk, Path(r.snapshot_path))
            for r in sorted(revisions, key=lambda r: r.commit_hash)
        ],
        freed_bytes=strategy.expected_freed_size,
        whole_repo=len(revisions) == len(repo.revisions),
    )


def remove(removal: Removal, cache: Path | None = None) -> int:
    """Delete through huggingface_hub's own cache deletion (blobs shared with a kept revision stay)."""
    from huggingface_hub import scan_cache_dir

    strategy = scan_cache_dir(cache).delete_revisions(*(r.commit for r in removal.revisions))
    freed = strategy.expected_freed_size
    strategy.execute()
    return freed


def holders(removal: Removal, pool: dict[str, Any]) -> list[str]:
    """The keys of pool entries that use any of ``removal``'s revisions (by id or by a path inside it)."""
    commits = {r.commit for r in removal.revisions}
    names = commits | {ref for r in removal.revisions for ref in r.refs}
    paths = [removal.repo_path] if removal.whole_repo else [r.path for r in removal.revisions]

    def uses(part: str) -> bool:
        if part == removal.repo_id:
            return True
        if part.startswith(removal.repo_id + "@"):
            return part.split("@", 1)[1] in names
        if part.startswith(("/", "~")):
            here = Path(part).expanduser()
            return any(here == p or p in here.parents for p in paths)
        return False

    found: list[str] = []
    for entry in pool.get("entries") or []:
        if not isinstance(entry, dict):
            continue
        key = str(entry.get("key", ""))
        parts = [*key.split("::"), str(entry.get("parent") or ""), str(entry.get("applied_adapter") or "")]
        if any(uses(p) for p in parts if p):
            found.append(key)
    return found


def refuse_if_held(removal: Removal, host: str | None, api_key: str | None) -> None:
    """Ask the mlxman server at ``host`` (or the default address) whether it holds the model: InUseError if
    it does, ServerError if it will not say (it wants an API key)."""
    from mlxman.client import PROBE_TIMEOUT, PoolClient, ServerAuthError, is_listening, server_address

    address = server_address(host)
    if not is_listening(address, PROBE_TIMEOUT):
        return
    try:
        pool = PoolClient(address, api_key, timeout=5.0).status()
    except ServerAuthError as exc:
        refused = "refused the API key sent" if api_key else "needs an API key"
        raise ServerError(
            f"The mlxman server at {address} {refused}, so it cannot say whether it holds {removal.repo_id}",
            exc.hint,
        ) from None
    except ServerError:
        return  # something else listens there: not an mlxman server, so it holds no model of ours
    keys = holders(removal, pool)
    if keys:
        raise InUseError(
            f"The mlxman server at {address} holds {removal.repo_id} ({_listing(keys, 2)})",
            f"unload it first (`mlxman pool unload {keys[0]}`), or stop the server",
        )
