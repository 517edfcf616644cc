"""Before a loader opens a model folder: every file it could open is a regular file, bounded by kind."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from mlxman import files
from mlxman.errors import AdapterError, ModelError
from mlxman.safetensors_header import HeaderError, read_header

# Files mlx-lm, mlx-vlm, mlx-embeddings and transformers may open while loading, by kind. Anything else in a
# model folder (README.md, LICENSE, *.bin, *.gguf, images) is opened by none of them and is not checked.
_TOKENIZER_PREFIXES = (
    "tokenizer",
    "vocab",
    "merges",
    "spiece",
    "sentencepiece",
    "special_tokens",
    "added_tokens",
)
_TOKENIZER_SUFFIXES = (".model", ".tiktoken", ".bpe", ".codes")
# Chat templates; not *.txt, *.jsonl or *.py (no loader opens a README, data or, without trust_remote_code,
# code), so a large dataset kept beside a model never refuses it.
_TEXT_SUFFIXES = (".jinja",)
# Bounded by its own header instead of a size: the loader reads exactly the byte ranges the header declares.
SAFETENSORS = 0
# sentence-transformers keep module configs a folder down (1_Pooling/config.json), and mlx-embeddings globs
# **/model*.safetensors: walk subfolders too, as deep as any real layout and then some.
_MAX_DEPTH = 8
# JSON this small parses in milliseconds; large ones (tokenizers) take ~0.1 s per MB with the depth check.
_PARSE_MAX_BYTES = 1024 * 1024
# A real model folder holds tens of files; past this many entries, the rest are not a model's.
_MAX_ENTRIES = 10_000


def _limit_for(name: str) -> int | None:
    """The size bound of a file a loader may open (SAFETENSORS: its header's), or None if none opens it."""
    lower = name.lower()
    if lower.endswith(".safetensors"):
        return SAFETENSORS
    if lower.endswith(".index.json"):
        return files.INDEX_MAX_BYTES
    if lower.endswith(".json") and "config" in lower:
        return files.CONFIG_MAX_BYTES
    # Other JSON: tokenizer.json, vocab.json, Mistral's tekken.json (~15 MB).
    if lower.startswith(_TOKENIZER_PREFIXES) or lower.endswith((*_TOKENIZER_SUFFIXES, ".json")):
        return files.TOKENIZER_MAX_BYTES
    if lower.endswith(_TEXT_SUFFIXES):
        return files.TEXT_MAX_BYTES
    return None


def _file_problem(path: Path, limit: int) -> str | None:
    """What makes ``path`` unfit for a loader to open, or None."""
    try:
        st = files.check_regular_file(path)
        if limit == SAFETENSORS:
            header = read_header(path)  # opened without blocking, checked on its descriptor
            extra = st.st_size - header.declared_size
            if extra > 0:
                return f"has {extra:,} bytes after its last tensor (the format allows none)"
        elif st.st_size > limit:
            return f"is {st.st_size:,} bytes, over the {limit:,}-byte limit for a file of its kind"
        elif path.suffix == ".json" and st.st_size <= _PARSE_MAX_BYTES:
            # Loaders parse JSON with Python's json and walk configs recursively: name a deep or non-UTF-8
            # file here. (A deep large tokenizer.json still fails in the loader, as a clear ModelError.)
            files.read_json(path, limit)
    except files.FileProblem as exc:
        return exc.problem
    except HeaderError as exc:
        return str(exc).removeprefix(f"{path.name}: ").removeprefix(f"{path.name} ")
    except ValueError as exc:
        return str(exc)
    return None


def _loader_files(root: Path) -> list[tuple[str, Path, int]]:
    """(name relative to ``root``, path, limit) of every entry a loader could open, subfolders included."""
    found: list[tuple[str, Path, int]] = []
    seen: set[tuple[int, int]] = set()
    budget = _MAX_ENTRIES
    pending = [(root, "", 0)]
    while pending and budget > 0:
        folder, prefix, depth = pending.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue  # a symlink back up the tree
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(itertools.islice(it, budget), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subfolder: no loader can read it either
        budget -= len(entries)
        for entry in entries:
            if entry.name.startswith("."):
                continue  # download caches and locks, never model files (glob skips them too)
            limit = _limit_for(entry.name)
            if limit is not None:
                found.append((prefix + entry.name, Path(entry.path), limit))
            elif depth + 1 < _MAX_DEPTH and _is_dir(entry):
                pending.append((Path(entry.path), f"{prefix}{entry.name}/", depth + 1))
    return found


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for a loop or a dangling link
    except OSError:
        return False


def check_loader_files(model_dir: Path, adapter_dir: Path | None = None) -> None:
    """Before any loader runs: every file it could open in the model (and a baked-in adapter) folder is a
    regular file within the bound for its kind. A FIFO there would block the loader forever, and every
    other load behind the pool's load lock with it; a link to /dev/zero would grow the process without end."""
    checks: list[tuple[Path, type[ModelError | AdapterError], str]] = [(model_dir, ModelError, "Model")]
    if adapter_dir is not None:
        checks.append((adapter_dir, AdapterError, "Adapter"))
    for folder, error, what in checks:
        for name, path, limit in _loader_files(folder):
            problem = _file_problem(path, limit)
            if problem is not None:
                shown = name if len(name) <= 80 else files.shown_name(path)
                raise error(
                    f"{what} {folder}: {shown} {problem}",
                    "replace it with the real file, or download the model again",
                )
