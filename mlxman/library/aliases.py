"""Short names for a model or a model+adapter pair, kept in one JSON file in the user directory.

A name has no ``/`` and starts with a letter or digit, so it can never be a Hugging Face id or a path with a
folder in it. Wherever a model id is taken, a name is looked up first: ``chat`` means the name even where a
folder ``./chat`` exists (write ``./chat`` for the folder), so a name means the same in every directory and
on the server. The file is read per lookup, skipped when its stat has not changed, so a running server sees
``mlxman alias`` changes at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from mlxman.errors import ConfigError, MlxmanError, NotFoundError, UsageError
from mlxman.files import MISSING, FileProblem, parse_json_object, path_problem, read_bounded
from mlxman.settings import user_dir

ALIASES_FILENAME = "aliases.json"
FORMAT_VERSION = 1
# A name file of thousands of names is a few hundred KB.
ALIASES_MAX_BYTES = 4 * 1024 * 1024
MAX_NAME_CHARS = 64
SEPARATOR = "::"  # as in pool keys: MODEL::ADAPTER
# The commands of `mlxman alias`: `mlxman alias ls MODEL` runs `alias ls`, so these could never be named so.
RESERVED_NAMES = frozenset({"ls", "rm", "set"})
# Letters, digits, '.', '_', '-', starting with a letter or digit, and an optional Ollama-style ':tag'.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?::[A-Za-z0-9._-]+)?")


@dataclass(frozen=True)
class Alias:
    """A name and what it stands for: a model id (absolute path or Hugging Face id) and maybe an adapter."""

    name: str
    model: str
    adapter: str | None = None
    created: float | None = None

    @property
    def target(self) -> str:
        return self.model if self.adapter is None else f"{self.model}{SEPARATOR}{self.adapter}"

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "model": self.model, "adapter": self.adapter, "target": self.target}


def aliases_path() -> Path:
    return user_dir() / ALIASES_FILENAME


def looks_like_name(text: str) -> bool:
    """Whether ``text`` could be a name (no disk access): the only specs ever looked up."""
    return len(text) <= MAX_NAME_CHARS and _NAME.fullmatch(text) is not None


def check_name(name: str) -> None:
    """UsageError, saying why, for a string that cannot be a name."""
    use = (
        f"use up to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', starting with a letter or digit, "
        "optionally with one ':tag' (such as chat or llama3:8b-colors)"
    )
    if not name:
        raise UsageError("The name is empty", use)
    if SEPARATOR in name:
        raise UsageError(
            f"The name {name!r} contains '{SEPARATOR}', which separates a model from its adapter", use
        )
    if "/" in name or "\\" in name or name.startswith((".", "~")):
        raise UsageError(f"The name {name!r} looks like a path", f"a name is not a path: {use}")
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(f"The name is {len(name)} characters long, over {MAX_NAME_CHARS}", use)
    if not looks_like_name(name):
        raise UsageError(f"The name {name!r} has characters a name cannot have", use)
    if name in RESERVED_NAMES:
        raise UsageError(f"The name {name!r} is a command of `mlxman alias`", "choose another name")


# -- reading ----------------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int, int, int], Mapping[str, Alias]]] = {}


def load_aliases(path: Path | None = None) -> Mapping[str, Alias]:
    """Every name in the file (none when there is no file), read-only; ConfigError for a broken file."""
    path = path or aliases_path()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    except OSError:
        st = None  # read_bounded says what is wrong
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) if st is not None else None
    with _cache_lock:
        cached = _cache.get(path)
    if stamp is not None and cached is not None and cached[0] == stamp:
        return cached[1]
    aliases = MappingProxyType(_read(path))  # shared by every caller: nobody may change it
    if stamp is not None:
        with _cache_lock:
            _cache[path] = (stamp, aliases)
    return aliases


def _read(path: Path) -> dict[str, Alias]:
    fix = "fix it, or delete it to forget every name (`mlxman alias` writes a new one)"
    try:
        if path_problem(path) == MISSING:
            return {}
        doc = parse_json_object(read_bounded(path, ALIASES_MAX_BYTES, "a names file"))
    except FileProblem as exc:
        raise ConfigError(f"Cannot read the names file {path}: {exc}", fix) from None
    except ValueError as exc:
        raise ConfigError(f"The names file {path} {exc}", fix) from None
    entries = doc.get("aliases")
    if doc.get("version") != FORMAT_VERSION or not isinstance(entries, dict):
        raise ConfigError(
            f"The names file {path} is not a version {FORMAT_VERSION} names file (no 'aliases' object)", fix
        )
    aliases: dict[str, Alias] = {}
    problems: list[str] = []
    for name, entry in entries.items():
        alias = _entry(name, entry)
        if alias is None:
            problems.append(repr(name[:MAX_NAME_CHARS]))
        else:
            aliases[name] = alias
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"The names file {path} has malformed entries: {shown}", fix)
    return aliases


def _entry(name: str, entry: object) -> Alias | None:
    if not looks_like_name(name) or not isinstance(entry, dict):
        return None
    model, adapter, created = entry.get("model"), entry.get("adapter"), entry.get("created")
    # What `alias` writes: an absolute model path or a Hugging Face id, never a name or a relative path.
    if not isinstance(model, str) or "/" not in model or model.startswith((".", "~")) or SEPARATOR in model:
        return None
    if adapter is not None and (not isinstance(adapter, str) or not adapter.startswith("/")):
        return None
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        created = None
    return Alias(name, model, adapter, float(created) if created is not None else None)


def lookup(text: str) -> Alias | None:
    """The name ``text`` stands for, if it is one; never touches the disk for a spec that cannot be a name."""
    if not looks_like_name(text):
        return None
    return load_aliases().get(text)


def names_by_key(keys: list[str], aliases: Mapping[str, Alias] | None = None) -> dict[str, list[str]]:
    """For each pool key, the names that stand for it (compared as text: no disk access).

    A name holding a Hugging Face id without a revision stands for that repo at any cached revision
    (pool keys are ``repo@revision``).
    """
    aliases = load_aliases() if aliases is None else aliases
    found: dict[str, list[str]] = {key: [] for key in keys}
    for key in keys:
        model, _, adapter = key.partition(SEPARATOR)
        for alias in aliases.values():
            if (alias.adapter or "") != adapter:
                continue
            if model == alias.model or ("@" not in alias.model and model.startswith(alias.model + "@")):
                found[key].append(alias.name)
    return {key: sorted(names) for key, names in found.items()}


# -- errors that name the alias ---------------------------------------------------------------------------


def about(alias: Alias, exc: MlxmanError) -> MlxmanError:
    """``exc`` (raised for the alias's target) reworded to name the alias, same type, same next step."""
    message = f"Name '{alias.name}' ({alias.target}): {exc.message}"
    hint = (exc.hint + "; or " if exc.hint else "") + (
        f"point the name elsewhere with `mlxman alias {alias.name} MODEL`, or `mlxman alias rm {alias.name}`"
    )
    try:
        return type(exc)(message, hint)
    except TypeError:  # an error type with its own constructor
        return MlxmanError(message, hint)


@contextlib.contextmanager
def errors_about(alias: Alias | None) -> Iterator[None]:
    """Errors raised while resolving ``alias``'s target name the alias."""
    if alias is None:
        yield
        return
    try:
        yield
    except MlxmanError as exc:
        raise about(alias, exc) from None


def model_only(alias: Alias) -> None:
    """A name for a model+adapter pair where only a model fits."""
    if alias.adapter is not None:
        raise UsageError(
            f"Name '{alias.name}' stands for a model with an adapter ({alias.target}); "
            "only a model fits here",
            f"pass its base model, {alias.model}, or give that model a name of its own",
        )


# -- writing ----------------------------------------------------------------------------------------------


def set_alias(name: str, target: str) -> tuple[Alias, Alias | None]:
    """Name ``target`` (MODEL or MODEL::ADAPTER, which must exist now); returns it and the alias it replaced.

    Paths are stored absolute and resolved; a Hugging Face id as given (so the name follows new downloads
    when no revision is given); a name given as the target is copied, not linked.
    """
    check_name(name)
    alias = _canonical(name, target)
    with _locked() as aliases:
        previous = aliases.get(name)
        aliases[name] = alias
        _write(aliases)
    return alias, previous


def remove_alias(name: str) -> Alias:
    return remove_aliases([name])[0]


def remove_aliases(names: list[str]) -> list[Alias]:
    """Forget every name in ``names`` (each once, in order), or none when one of them is not a name."""
    names = list(dict.fromkeys(names))
    with _locked() as aliases:
        for name in names:
            if name not in aliases:
                raise NotFoundError(f"No name '{name}'", "see `mlxman alias ls` for the names there are")
        removed = [aliases.pop(name) for name in names]
        _write(aliases)
    return removed


def _canonical(name: str, target: str) -> Alias:
    from mlxman.pool.keys import resolve_target, split_key

    model_spec, adapter_spec = split_key(target.strip())
    if not model_spec:
        raise UsageError(f"No model in {target!r}", "pass MODEL or MODEL::ADAPTER")
    if adapter_spec == "":
        raise UsageError(f"No adapter after '{SEPARATOR}' in {target!r}", "pass MODEL or MODEL::ADAPTER")
    resolved = resolve_target(model_spec, adapter_spec)  # the target must exist, and is checked as any id
    inner = lookup(model_spec)
    if resolved.model.repo_id is None:
        model = str(resolved.model.path)
    elif inner is not None:
        model = inner.model
    else:
        model = model_spec
    adapter = str(resolved.adapter) if resolved.adapter is not None else None
    return Alias(name, model, adapter, time.time())


@contextlib.contextmanager
def _locked() -> Iterator[dict[str, Alias]]:
    """The names, read under a lock held until the block ends: two `alias` commands never lose a change."""
    path = aliases_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(ALIASES_FILENAME + ".lock"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield dict(_read(path))
    finally:
        os.close(fd)


def _write(aliases: dict[str, Alias]) -> None:
    """Write the file whole, then rename it over the old one: a reader sees the old file or the new."""
    import tempfile  # only writers need it (a few ms of start-up otherwise)

    path = aliases_path()
    doc = {
        "version": FORMAT_VERSION,
        "aliases": {
            a.name: {"model": a.model, "adapter": a.adapter, "created": a.created}
            for a in sorted(aliases.values(), key=lambda a: a.name)
        },
    }
    fd, temp = tempfile.mkstemp(prefix=".aliases-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
