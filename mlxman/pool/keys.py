"""Canonical pool keys: a base model's id, or ``model_id::adapter_path`` with an absolute adapter path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxman.adapters.formats import CONFIG_FILE, MLX_WEIGHTS
from mlxman.errors import AdapterError, NotFoundError
from mlxman.files import MISSING, path_problem, shown_path
from mlxman.library.aliases import errors_about, lookup
from mlxman.models.resolve import ResolvedModel, cached_adapter, resolve_model

SEPARATOR = "::"
# The adapter package owns the mlx-lm file names and the bounded config reader; the pool uses the same ones.
ADAPTER_CONFIG = CONFIG_FILE
ADAPTER_WEIGHTS = MLX_WEIGHTS


def adapter_key(model_id: str, adapter_path: Path) -> str:
    return f"{model_id}{SEPARATOR}{adapter_path}"


def split_key(spec: str) -> tuple[str, str | None]:
    """Split ``model::adapter`` into its two parts; a plain model spec has no adapter."""
    model, sep, adapter = spec.partition(SEPARATOR)
    return model, (adapter if sep else None)


def resolve_adapter_dir(spec: str) -> Path:
    """The absolute directory of an mlx-lm adapter, so ``./a`` and ``/abs/a`` name one entry."""
    given = Path(spec).expanduser()
    problem = path_problem(given, want_dir=True)
    cached = cached_adapter(spec) if problem == MISSING else None
    if cached is not None:  # an adapter repo in the Hugging Face cache, by its id (as `ls` lists it)
        given, problem = cached, None
    if problem == MISSING:
        raise NotFoundError(f"Adapter path {spec} does not exist", "check the path to the adapter directory")
    if problem:
        words = problem.replace("not a folder", "not an adapter directory")
        raise AdapterError(f"Adapter path {shown_path(spec)} {words}", "pass the folder holding the adapter")
    path = given.resolve()
    config = path_problem(path / ADAPTER_CONFIG)
    if config == MISSING:
        raise AdapterError(
            f"{spec} has no {ADAPTER_CONFIG}, so it is not an mlx-lm adapter",
            "pass the folder `mlx_lm lora` wrote, or convert a PEFT adapter with `mlxman adapter convert`",
        )
    if config:
        raise AdapterError(
            f"Adapter {spec}: {ADAPTER_CONFIG} {config}", "run `mlxman adapter validate` on it"
        )
    return path


@dataclass(frozen=True)
class Target:
    """What one request names: a base model and, optionally, an adapter on it."""

    model: ResolvedModel
    adapter: Path | None

    @property
    def base_key(self) -> str:
        return self.model.id

    @property
    def key(self) -> str:
        return self.base_key if self.adapter is None else adapter_key(self.base_key, self.adapter)


def resolve_target(model: str, adapter: str | None = None) -> Target:
    """Resolve what a caller typed; ``model`` may itself be ``model::adapter``, and its model part a name
    (``mlxman alias``) for a model or for a model with its adapter."""
    model_spec, embedded = split_key(model)
    alias = lookup(model_spec)
    if alias is not None:
        given = embedded if embedded is not None else adapter
        if alias.adapter is not None and given is not None and not _same_adapter(given, alias.adapter):
            raise AdapterError(
                f"Name '{alias.name}' already stands for a model with an adapter ({alias.target}), and "
                f"{given!r} was given too",
                f"name the adapter once: `{alias.name}` alone, or its model {alias.model} with your adapter",
            )
        model_spec, embedded = alias.model, embedded if alias.adapter is None else alias.adapter
        adapter = None if alias.adapter is not None else adapter
    if embedded is not None and adapter is not None and embedded != adapter:
        raise AdapterError(
            f"Two adapters given for one request: {embedded!r} in the model name and {adapter!r}",
            "name the adapter once",
        )
    adapter_spec = adapter if adapter is not None else embedded
    with errors_about(alias):
        resolved = resolve_model(model_spec)
        adapter_dir = resolve_adapter_dir(adapter_spec) if adapter_spec else None
    return Target(model=resolved, adapter=adapter_dir)


def _same_adapter(given: str, stored: str) -> bool:
    """Whether ``given`` (as typed: relative, ``~``) names the adapter folder a name keeps absolute."""
    if given == stored:
        return True
    try:
        return Path(given).expanduser().resolve() == Path(stored)
    except (OSError, RuntimeError, ValueError):
        return False
