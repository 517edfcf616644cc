"""Who may call the server (API key) and which model and adapter paths a request may name (roots)."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from urllib.parse import urlsplit

from mlxman.errors import MlxmanError, NotFoundError, UsageError
from mlxman.library.aliases import Alias
from mlxman.library.aliases import lookup as lookup_alias
from mlxman.pool.keys import SEPARATOR as KEY_SEPARATOR


class AccessDenied(MlxmanError):
    """A request named a path outside the configured roots, or an entry the operator has not loaded."""


class Unauthorized(MlxmanError):
    """A request without the server's API key."""


class HostNotAllowed(MlxmanError):
    """A Host header that names another machine, sent to a loopback server."""


# Where the Gate middleware leaves, in the request's scope state, whether the caller holds the admin key.
ADMIN_SCOPE_KEY = "mlxman_admin"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Longest file or folder name most file systems allow (NAME_MAX); longer ones fail with ENAMETOOLONG.
MAX_NAME_CHARS = 255
# Files checked for links out of a root in one model or adapter folder; real ones hold a few dozen.
MAX_FILES_CHECKED = 10_000


def host_name(header: str) -> str | None:
    """The host name in a ``Host`` header (None when there is none); UsageError when it is malformed."""
    if not header:
        return None
    try:
        parts = urlsplit(f"//{header}")
        name, _ = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError:
        name = None
    if not name or parts.username is not None or parts.path or parts.query or parts.fragment:
        raise UsageError(
            f"Malformed Host header {header!r}", "send host or host:port, such as 127.0.0.1:11435"
        )
    return name


def check_bearer(header: str | None, api_key: str | None, admin_key: str | None = None) -> bool:
    """Accept ``Authorization: Bearer <key>`` (compared in constant time); True when it is the admin key.

    The admin key opens everything the API key opens. With no API key, callers need none (but are no admin).
    """
    scheme, _, token = (header or "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    if admin_key and presented and hmac.compare_digest(presented, admin_key.encode()):
        return True
    if api_key and not (presented and hmac.compare_digest(presented, api_key.encode())):
        raise Unauthorized("Missing or wrong API key", "send the header `Authorization: Bearer <key>`")
    return False


@dataclass(frozen=True)
class ModelRef:
    """A pool entry a request asks for: a canonical model id and, maybe, an absolute adapter path."""

    model: str
    adapter: str | None = None
    # The name (``mlxman alias``) the request used, if it used one: answers carry it, never its target.
    name: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}{KEY_SEPARATOR}{self.adapter}" if self.adapter else self.model

    @property
    def shown(self) -> str:
        """What an answer's ``model`` says: the name asked for, else the pool's key."""
        return self.name or self.key


def split_key(spec: str) -> tuple[str, str | None]:
    """``model_id::adapter_path`` -> its two parts (the adapter part may be missing)."""
    model, sep, adapter = spec.partition(KEY_SEPARATOR)
    if not model or (sep and not adapter) or KEY_SEPARATOR in adapter:
        raise UsageError(
            f"Invalid model name {spec!r}", f"use a model id, or model_id{KEY_SEPARATOR}adapter_path"
        )
    return model, (adapter or None)


class PathPolicy:
    """Requests may name what the operator loaded, or paths that really lie under one of the roots.

    A path under a root is accepted only when every file in its folder, after following symlinks, lies under a
    root too: a model folder whose tokenizer links to a file elsewhere would otherwise serve that file.
    """

    def __init__(self, roots: Sequence[Path] = ()) -> None:
        for root in roots:
            if not root.is_dir():
                raise UsageError(
                    f"Root {root} is not a directory", "pass an existing folder to --adapter-root"
                )
        self.roots: tuple[Path, ...] = tuple(root.resolve() for root in roots)
        # Absolute paths in requests are first checked as written, against the roots as given and as resolved.
        self._spellings = {*self.roots, *(root.absolute() for root in roots)}

    def resolve(self, spec: str, loaded: Collection[str]) -> ModelRef:
        """The entry ``spec`` names, or AccessDenied / NotFoundError; ``loaded`` holds the pool's keys."""
        model_part, adapter_part = split_key(spec)
        if spec in loaded:
            return ModelRef(model_part, adapter_part)
        check_names(model_part, "model")
        if adapter_part is not None:
            check_names(adapter_part, "adapter")
        alias = lookup_alias(model_part)
        if alias is not None:
            return replace(self._resolve_alias(alias, adapter_part, loaded), name=spec)
        return self._resolve(model_part, adapter_part, loaded)

    def _resolve_alias(self, alias: Alias, adapter_part: str | None, loaded: Collection[str]) -> ModelRef:
        """A name (``mlxman alias``) is served only when what it stands for would be: the roots apply to its
        target's paths, as if the request had named them. Refusals do not show the target."""
        if alias.adapter is not None and adapter_part is not None and adapter_part != alias.adapter:
            raise UsageError(
                f"The name {alias.name!r} already stands for a model with an adapter, and an adapter was "
                "given too",
                f"send `{alias.name}` alone",
            )
        adapter = alias.adapter if alias.adapter is not None else adapter_part
        try:
            # A Hugging Face id is served as when a request names it: loaded, or its snapshot in a root.
            return self._resolve(alias.model, adapter, loaded)
        except AccessDenied as exc:
            raise AccessDenied(
                f"The name {alias.name!r} stands for a model or adapter this server does not serve", exc.hint
            ) from None
        except NotFoundError as exc:
            raise NotFoundError(
                f"The name {alias.name!r} stands for a model or adapter not found under the server's roots",
                exc.hint,
            ) from None

    def loaded_key(self, spec: str, loaded: Collection[str]) -> str:
        """The loaded entry ``spec`` names (for unload, pin and unpin): never a path on disk beyond that."""
        try:
            ref = self.resolve(spec, loaded)
        except (NotFoundError, AccessDenied):
            # One answer for every key that names nothing loaded, whether or not its path exists.
            ref = None
        if ref is None or ref.key not in loaded:
            raise NotFoundError(
                f"'{spec}' is not loaded in the pool", "see `mlxman pool status` for the loaded keys"
            )
        return ref.key

    def _resolve(self, model_part: str, adapter_part: str | None, loaded: Collection[str]) -> ModelRef:
        bases = {key.partition(KEY_SEPARATOR)[0] for key in loaded}
        model = model_part if model_part in bases else self._loaded_alias(model_part, bases)
        if model is None:
            model = self._model_under_root(model_part)
        if adapter_part is None:
            return ModelRef(model)
        if f"{model}{KEY_SEPARATOR}{adapter_part}" in loaded:
            return ModelRef(model, adapter_part)
        absolute = _absolute(adapter_part)
        if absolute and f"{model}{KEY_SEPARATOR}{absolute}" in loaded:
            return ModelRef(model, absolute)
        return ModelRef(model, str(self._under_root(adapter_part, "adapter")))

    def _model_under_root(self, text: str) -> str:
        """A model path under a root; else a Hugging Face id whose cached snapshot lies in a root (a root at
        the cache's ``hub`` folder serves cached models by their ids). One answer for a missing model and for
        a cached one outside the roots."""
        try:
            return str(self._under_root(text, "model"))
        except NotFoundError:
            cached = self._cached_in_root(text)
            if cached is None:
                raise
            return cached

    def _cached_in_root(self, text: str) -> str | None:
        from mlxman.models.resolve import looks_like_repo_id, resolve_model

        if not looks_like_repo_id(text.partition("@")[0]):
            return None
        try:
            resolved = resolve_model(text)
        except (MlxmanError, OSError):
            return None
        real = _real(resolved.path)
        if not self._inside(real):
            return None
        self._check_files_inside(real, text, "model")
        return resolved.id

    def _loaded_alias(self, text: str, bases: Collection[str]) -> str | None:
        """Another spelling of a loaded base (a relative path, a Hugging Face id without revision)."""
        from mlxman.models.resolve import resolve_model

        if ".." in PurePath(text).parts:
            return None
        try:
            canonical = resolve_model(text).id
        except (MlxmanError, OSError):
            return None
        return canonical if canonical in bases else None

    def _under_root(self, text: str, what: str) -> Path:
        if not self.roots:
            raise AccessDenied(
                f"The {what} {text!r} is not loaded, and this server serves only what its operator loaded",
                "the operator can load it with `mlxman pool load` (with the admin key, if the server has "
                "one), or start the server with --adapter-root DIR",
            )
        path = PurePath(text)
        if ".." in path.parts:
            raise AccessDenied(
                f"The {what} path {text!r} contains '..'", "name paths inside the server's roots"
            )
        if path.is_absolute():
            if not any(Path(text).is_relative_to(root) for root in self._spellings):
                raise AccessDenied(
                    f"The {what} path {text!r} is outside the server's roots", _roots_hint(self.roots)
                )
            candidates = [Path(text)]
        else:
            candidates = [root / path for root in self.roots]
        for candidate in candidates:
            try:
                if not candidate.exists():
                    continue
                real = _real(candidate)
            except OSError as exc:
                raise NotFoundError(
                    f"Cannot read the {what} path {text!r}: {exc.strerror}", _roots_hint(self.roots)
                ) from None
            # The check that matters: after following every symlink, the target must still be inside a root.
            if not self._inside(real):
                raise AccessDenied(
                    f"The {what} path {text!r} leads outside the server's roots (through a symlink)",
                    _roots_hint(self.roots),
                )
            if real.is_dir():
                self._check_files_inside(real, text, what)
            return real
        raise NotFoundError(f"No {what} {text!r} under the server's roots", _roots_hint(self.roots))

    def _inside(self, real: Path) -> bool:
        return any(real.is_relative_to(root) for root in self.roots)

    def _check_files_inside(self, folder: Path, text: str, what: str) -> None:
        """Every file and folder in ``folder``, symlinks followed, must lie under a root."""
        pending, seen, count = [folder], {folder}, 0
        while pending:
            current = pending.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as exc:
                raise AccessDenied(
                    f"Cannot list the {what} folder {text!r}: {exc.strerror}", _roots_hint(self.roots)
                ) from None
            for entry in entries:
                count += 1
                if count > MAX_FILES_CHECKED:
                    raise AccessDenied(
                        f"The {what} folder {text!r} holds over {MAX_FILES_CHECKED} files",
                        "name a model or adapter folder, not a folder of many",
                    )
                path = Path(entry.path)
                if entry.is_symlink():
                    path = _real(path)
                    if not self._inside(path):
                        inner = Path(entry.path).relative_to(folder)
                        raise AccessDenied(
                            f"The {what} {text!r} holds {str(inner)!r}, a link that leads outside the "
                            "server's roots",
                            "copy the file into the folder, or add where it links to with --adapter-root",
                        )
                if path.is_dir() and path not in seen:
                    seen.add(path)
                    pending.append(path)


def check_names(text: str, what: str) -> None:
    """A file or folder name longer than file systems allow is a malformed request, not a server error."""
    if any(len(part.encode()) > MAX_NAME_CHARS for part in PurePath(text).parts):
        raise UsageError(
            f"The {what} path has a name over {MAX_NAME_CHARS} characters",
            f"file and folder names are at most {MAX_NAME_CHARS} characters long",
        )


def is_name_too_long(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG


def _real(path: Path) -> Path:
    """Symlinks followed; unlike ``Path.resolve`` on Python 3.11, a symlink loop is no RuntimeError."""
    return Path(os.path.realpath(path))


def _absolute(text: str) -> str | None:
    path = Path(text)
    return str(_real(path)) if path.is_absolute() and ".." not in path.parts else None


def _roots_hint(roots: Sequence[Path]) -> str:
    return "paths must lie under: " + ", ".join(str(r) for r in roots)
