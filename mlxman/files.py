"""The one reader of user files: regular files only, bounded by kind, and never blocked by a FIFO."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

MiB = 1024 * 1024
# Size bounds by kind of file. Each is a few times the largest real file of its kind, so a real model always
# passes and a sparse or endless file (a 4 GB config.json, a link to /dev/zero) is refused before a read.
# config.json and other JSON configs: a few KB, a few MB with a per-module quantization map of a large MoE.
CONFIG_MAX_BYTES = 16 * MiB
# adapter_config.json: a few KB, even with every training argument in it.
ADAPTER_CONFIG_MAX_BYTES = 1 * MiB
# Tokenizer files: Gemma 3's tokenizer.json (262k tokens) is ~33 MB, the largest in common use.
TOKENIZER_MAX_BYTES = 128 * MiB
# model.safetensors.index.json: ~100 bytes per tensor, ~10 MB for the largest MoE checkpoints.
INDEX_MAX_BYTES = 64 * MiB
# Chat templates (chat_template.jinja): KBs.
TEXT_MAX_BYTES = 16 * MiB
# mlxman's own config.toml: a dozen keys.
SETTINGS_MAX_BYTES = 1 * MiB
# Images for vision models: a 50-megapixel photo is ~30 MB even as PNG.
IMAGE_MAX_BYTES = 256 * MiB
# Real configs nest 3-5 levels; loaders walk them recursively, so deeper ones would exhaust the stack there.
MAX_JSON_DEPTH = 64
# Linux and macOS limit one path component to 255 bytes.
NAME_MAX = 255

# What path_problem says when nothing is at the path, and the start of what it says for a name too long.
MISSING = "is missing"
TOO_LONG = "has a name too long"

# Opening with O_NONBLOCK returns at once even on a FIFO with no writer; fstat then tells what was opened.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


class FileProblem(Exception):
    """A file that cannot be used; ``str()`` is the file's name followed by what is wrong with it."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


def _short(part: str) -> str:
    return part if len(part) <= 60 else f"{part[:28]}...{part[-28:]} ({len(part)} characters)"


def shown_name(path: Path) -> str:
    """The path's last part, shortened in the middle when it is too long to read in a message."""
    return _short(path.name or str(path))


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a message, each over-long part shortened in the middle."""
    return "/".join(_short(part) for part in os.fspath(path).split("/"))


def _too_long(path: Path) -> str:
    longest = max((len(os.fsencode(p)) for p in path.parts), default=0)
    if longest > NAME_MAX:
        return f"{TOO_LONG}: one part of its path is {longest} bytes, over the {NAME_MAX}-byte limit"
    return f"{TOO_LONG} for the file system"


def too_long(problem: str | None) -> bool:
    """Whether ``path_problem`` found a name no file system holds: a malformed request, not a missing file."""
    return problem is not None and problem.startswith(TOO_LONG)


def _mode_problem(mode: int, want_dir: bool) -> str | None:
    """What a stat mode is, worded for a user, when it is not what was wanted; None when it is."""
    if stat.S_ISDIR(mode):
        return None if want_dir else "is a directory, not a file"
    if stat.S_ISREG(mode):
        return "is a file, not a folder" if want_dir else None
    thing = "a folder" if want_dir else "a file"
    if stat.S_ISFIFO(mode):
        return f"is a FIFO (named pipe), not {thing}"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"is a device, not {thing}"
    if stat.S_ISSOCK(mode):
        return f"is a socket, not {thing}"
    return f"is not {thing}"


def _error_problem(path: Path, exc: OSError) -> str:
    """An OSError from stat or open, worded for a user."""
    if exc.errno == errno.ELOOP:
        return "is a symlink loop"
    if exc.errno == errno.ENAMETOOLONG:
        return _too_long(path)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        try:
            dangling = os.path.islink(path)
        except (OSError, ValueError):
            dangling = False
        return "is a dangling symlink" if dangling else MISSING
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read: permission denied"
    return f"cannot be read: {exc.strerror or exc}"


def path_problem(path: Path, want_dir: bool = False) -> str | None:
    """What is wrong with ``path`` as a regular file (or a folder), after symlinks; None when nothing is."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return _error_problem(path, exc)
    except ValueError:  # an embedded NUL byte
        return "has an invalid name"
    return _mode_problem(st.st_mode, want_dir)


def check_regular_file(path: Path) -> os.stat_result:
    """Stat ``path`` (after symlinks) and insist on a regular file; FileProblem says what it is instead."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FileProblem(shown_name(path), _error_problem(path, exc)) from None
    except ValueError:
        raise FileProblem(shown_name(path), "has an invalid name") from None
    problem = _mode_problem(st.st_mode, want_dir=False)
    if problem:
        raise FileProblem(shown_name(path), problem)
    return st


def exists(path: Path) -> bool:
    """Whether anything (a dangling or looping link included) is at ``path``; never raises, unlike
    ``Path.exists``, which raises on a name too long and calls a symlink loop absent."""
    try:
        os.lstat(path)
    except (OSError, ValueError):
        return False
    return True


def open_regular(path: Path) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading, without ever blocking; FileProblem for anything else.

    The opened descriptor is checked too, so a file swapped for a FIFO or a device after the first check is
    refused rather than read (or waited on)."""
    name = shown_name(path)
    check_regular_file(path)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FileProblem(name, _error_problem(path, exc)) from None
    f = os.fdopen(fd, "rb")
    st = os.fstat(fd)
    problem = _mode_problem(st.st_mode, want_dir=False)
    if problem:
        f.close()
        raise FileProblem(name, problem)
    return f, st


def read_bounded(path: Path, limit: int, what: str = "a config", allow_empty: bool = False) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (``what`` names the kind in the error)."""
    name = shown_name(path)
    f, st = open_regular(path)
    with f:
        if st.st_size > limit:
            raise FileProblem(name, f"is {st.st_size:,} bytes, over the {limit:,}-byte limit for {what}")
        try:
            raw = f.read(limit + 1)
        except OSError as exc:
            raise FileProblem(name, f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise FileProblem(name, f"is over the {limit:,}-byte limit for {what}")
    if not allow_empty and not raw.strip():
        raise FileProblem(name, "is empty")
    return raw


def json_depth(doc: Any) -> int:
    """How deeply ``doc`` nests lists and objects (iteratively: a deep document must not recurse here)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(raw: bytes) -> Any:
    """Decode bytes as JSON of sane depth; ValueError in plain words (after the file's name) otherwise."""
    deep = f"is nested too deeply to be a config (over {MAX_JSON_DEPTH} levels)"
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ValueError(deep) from None
    if json_depth(doc) > MAX_JSON_DEPTH:
        raise ValueError(deep)
    return doc


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Like ``parse_json``, and the document must be an object."""
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise ValueError(f"holds a JSON {type(doc).__name__}, not an object")
    return doc


def read_json(path: Path, limit: int = CONFIG_MAX_BYTES, what: str = "a config") -> Any:
    """A bounded JSON document from ``path``; FileProblem for the file, ValueError for its content."""
    return parse_json(read_bounded(path, limit, what))


def read_json_object(path: Path, limit: int = CONFIG_MAX_BYTES, what: str = "a config") -> dict[str, Any]:
    """A bounded JSON object from ``path``; FileProblem for the file, ValueError for its content."""
    return parse_json_object(read_bounded(path, limit, what))
