"""Who may call the server (API key) and which model and adapter paths a request may name (roots)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from mlxman.errors import MlxmanError, NotFoundError, UsageError
from mlxman.pool.keys import SEPARATOR as KEY_SEPARATOR


class AccessDenied(MlxmanError):
    """A request named a path outside the configured roots, or an entry the operator has not loaded."""


class Unauthorized(MlxmanError):
    """A request without the server's API key."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bearer(header: str | None, api_key: str | None) -> None:
    """Accept ``Authorization: Bearer <key>`` (compared in constant time); no key configured, no check."""
    if not api_key:
        return
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthorized("Missing or wrong API key", "send the header `Authorization: Bearer <key>`")


@dataclass(frozen=True)
class ModelRef:
    """A pool entry a request asks for: a canonical model id and, maybe, an absolute adapter path."""

    model: str
    adapter: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}{KEY_SEPARATOR}{self.adapter}" if self.adapter else self.model


def split_key(spec: str) -> tuple[str, str | None]:
    """``model_id::adapter_path`` -> its two parts (the adapter part may be missing)."""
    model, sep, adapter = spec.partition(KEY_SEPARATOR)
    if not model or (sep and not adapter) or KEY_SEPARATOR in adapter:
        raise UsageError(
            f"Invalid model name {spec!r}", f"use a model id, or model_id{KEY_SEPARATOR}adapter_path"
        )
    return model, (adapter or None)


class PathPolicy:
    """Requests may name what the operator loaded, or paths that really lie under one of the roots."""

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
        bases = {key.partition(KEY_SEPARATOR)[0] for key in loaded}
        model = model_part if model_part in bases else self._loaded_alias(model_part, bases)
        if model is None:
            model = str(self._under_root(model_part, "model"))
        if adapter_part is None:
            return ModelRef(model)
        if f"{model}{KEY_SEPARATOR}{adapter_part}" in loaded:
            return ModelRef(model, adapter_part)
        absolute = _absolute(adapter_part)
        if absolute and f"{model}{KEY_SEPARATOR}{absolute}" in loaded:
            return ModelRef(model, absolute)
        return ModelRef(model, str(self._under_root(adapter_part, "adapter")))

    def _loaded_alias(self, text: str, bases: Collection[str]) -> str | None:
        """Another spelling of a loaded base (a relative path, a Hugging Face id without revision)."""
        from mlxman.models.resolve import resolve_model

        if ".." in PurePath(text).parts:
            return None
        try:
            canonical = resolve_model(text).id
        except MlxmanError:
            return None
        return canonical if canonical in bases else None

    def _under_root(self, text: str, what: str) -> Path:
        if not self.roots:
            raise AccessDenied(
                f"The {what} {text!r} is not loaded, and this server serves only what its operator loaded",
                "load it with `mlxman pool load`, or start the server with --adapter-root DIR",
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
            if not candidate.exists():
                continue
            real = candidate.resolve()
            # The check that matters: after following every symlink, the target must still be inside a root.
            if not any(real.is_relative_to(root) for root in self.roots):
                raise AccessDenied(
                    f"The {what} path {text!r} leads outside the server's roots (through a symlink)",
                    _roots_hint(self.roots),
                )
            return real
        raise NotFoundError(f"No {what} {text!r} under the server's roots", _roots_hint(self.roots))


def _absolute(text: str) -> str | None:
    path = Path(text)
    return str(path.resolve()) if path.is_absolute() and ".." not in path.parts else None


def _roots_hint(roots: Sequence[Path]) -> str:
    return "paths must lie under: " + ", ".join(str(r) for r in roots)
