"""Every model and adapter a user has, described from config files and safetensors headers alone.

Sources: the Hugging Face cache, the folders named by ``model_dirs`` (config) or ``$MLXMAN_MODEL_DIRS``,
and the names of ``mlxman alias``. Nothing is loaded and nothing heavy is imported; an entry that cannot be
read is listed with the reason, never raised.

The Hugging Face cache is read by its documented layout (``models--ORG--NAME/{refs,snapshots}``) under
huggingface_hub's own cache location, not with ``huggingface_hub.scan_cache_dir``: importing that pulls in
huggingface_hub's HTTP stack, which alone costs more than the whole of ``mlxman ls`` may take. A test
checks this reading against ``scan_cache_dir``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlxman.errors import MlxmanError
from mlxman.files import CONFIG_MAX_BYTES, FileProblem, exists, path_problem, read_bounded, read_json_object
from mlxman.safetensors_header import HeaderError, SafetensorsHeader, TensorInfo

CONFIG_FILE = "config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
HF_CACHE = "hf-cache"
FOLDER = "folder"
MISSING_BASE = "missing"
# How deep under a model folder `ls` looks (root/org/name/ is two levels), and how many folders it reads at
# most per root: a model folder pointed at a home directory must not walk the whole disk.
MAX_DEPTH = 3
MAX_FOLDERS_PER_ROOT = 10_000
REF_MAX_BYTES = 1024

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8",
    "F8_E5M2": "float8",
}


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter folder: what it is, which base it records, and its size."""

    name: str
    path: str
    base: str | None = None
    format: str | None = None
    fine_tune_type: str | None = None
    rank: int | None = None
    parameters: int | None = None
    size_bytes: int | None = None
    # The pool's count for it once loaded on its base (its tensors' bytes).
    estimate_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ModelEntry:
    """A model ``--model`` can take (``id``), with what its files say, and the adapters made for it.

    ``source`` is ``hf-cache``, ``folder`` (under a model folder), or ``missing``: a base that adapters
    name but that is not on this machine.
    """

    id: str
    source: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    kind: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    size_bytes: int | None = None
    # What the pool would admit it with: weights plus KV cache for ``context_tokens``.
    estimate_bytes: int | None = None
    context_tokens: int | None = None
    fits: bool | None = None
    adapters: tuple[AdapterEntry, ...] = ()
    names: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class NameEntry:
    """A name from ``mlxman alias`` and what it stands for; ``error`` when its model or adapter is gone."""

    name: str
    model: str
    adapter: str | None
    target: str
    error: str | None = None


@dataclass(frozen=True)
class Library:
    """The listing: models (adapters under their base), names, the budget the fit is judged by, and where
    ``ls`` looked."""

    models: list[ModelEntry]
    names: list[NameEntry]
    budget_bytes: int
    budget_source: str
    context_tokens: int
    hf_cache: str
    model_dirs: list[str]
    model_dirs_source: str
    problems: list[str] = field(default_factory=list)


# -- the public calls ------------------------------------------------------------------------------------


def list_models(
    *,
    kind: str | None = None,
    match: str | None = None,
    budget_bytes: int | None = None,
    context_tokens: int | None = None,
) -> list[ModelEntry]:
    """Every model on this machine (cache and model folders), adapters under their base; filtered by kind and
    a case-insensitive substring of the id, folder, names or adapter names. ``budget_bytes`` and
    ``context_tokens`` default to what a pool started now would use."""
    return scan(kind=kind, match=match, budget_bytes=budget_bytes, context_tokens=context_tokens).models


def scan(
    *,
    kind: str | None = None,
    match: str | None = None,
    budget_bytes: int | None = None,
    context_tokens: int | None = None,
    memory_limit: str | None = None,
    context_length: int | None = None,
) -> Library:
    """The whole listing, with the budget and the places looked at (for ``mlxman ls``). ``memory_limit``
    and ``context_length`` are the flags, resolved as a pool resolves them."""
    from mlxman.settings import load_config, model_dirs, resolve_pool_limits

    config = load_config()
    problems: list[str] = []
    if budget_bytes is None:
        from mlxman.memory import resolve_budget, total_memory

        budget = resolve_budget(memory_limit, config, total_memory())
        budget_bytes, budget_source = budget.limit_bytes, budget.source
    else:
        budget_source = "given"
    if context_tokens is None:
        context_tokens = resolve_pool_limits(context_length, None, config).context_tokens
    dirs, dirs_source = model_dirs(config)
    demo = _built_demo_kit()
    if demo is not None and not any(_covers(d, demo) for d in dirs):
        # What `mlxman demo` built is listed without a setting, as a new user expects after running it.
        dirs_source = f"{dirs_source}, and the demo kit" if dirs else "the demo kit"
        dirs = [*dirs, demo]
    cache = hf_cache_dir()

    models: list[ModelEntry] = []
    adapters: list[AdapterEntry] = []
    for entry in _cache_entries(cache, problems):
        if isinstance(entry, AdapterEntry):
            adapters.append(entry)
        else:
            models.append(entry)
    for root in dirs:
        found_models, found_adapters = _folder_entries(root, problems)
        models.extend(found_models)
        adapters.extend(found_adapters)
    names = list_names(problems)
    # Matched on names alone first, so that `ls WORD` reads the headers of the matches only.
    models = [m for m in _attach(_dedupe(models), adapters, names) if _wanted(m, None, match)]
    models = [_describe(m, budget_bytes, context_tokens) if m.error is None else m for m in models]
    models = [m for m in models if _wanted(m, kind, None)]
    if match:
        names = [n for n in names if match.lower() in f"{n.name} {n.target}".lower()]
    if kind is not None:  # the names of the models listed, not those of other kinds
        listed = {key for m in models for key in _model_keys(m)}
        names = [n for n in names if normal_spec(n.model) in listed]
    return Library(
        models=models,
        names=names,
        budget_bytes=budget_bytes,
        budget_source=budget_source,
        context_tokens=context_tokens,
        hf_cache=str(cache),
        model_dirs=[str(d) for d in dirs],
        model_dirs_source=dirs_source,
        problems=problems,
    )


def scan_folders(roots: Iterable[Path]) -> tuple[list[ModelEntry], list[AdapterEntry]]:
    """The models and adapters under ``roots`` as found (not described): the folder walk of ``ls``, bounded
    the same way, for what a server with these roots may serve (its ``/v1/models``)."""
    problems: list[str] = []
    models: list[ModelEntry] = []
    adapters: list[AdapterEntry] = []
    for root in roots:
        found_models, found_adapters = _folder_entries(root, problems)
        models.extend(found_models)
        adapters.extend(found_adapters)
    return _dedupe(models), adapters


def cached_models() -> list[ModelEntry]:
    """The models in the Hugging Face cache as found (not described), ids as ``--model`` takes them."""
    return list(_cache_models(hf_cache_dir(), []))


def list_names(problems: list[str] | None = None) -> list[NameEntry]:
    """The names of ``mlxman alias``, each checked for a model (and adapter) still there; a names file that
    cannot be read gives none, and says why in ``problems``."""
    # Integration point with mlxman.library.aliases (the name store): read through its loader only.
    from mlxman.library.aliases import load_aliases

    try:
        aliases = load_aliases()
    except MlxmanError as exc:
        if problems is not None:
            problems.append(f"{exc.message}; {exc.hint}" if exc.hint else exc.message)
        return []
    entries = []
    for alias in sorted(aliases.values(), key=lambda a: a.name):
        entries.append(
            NameEntry(
                name=alias.name,
                model=alias.model,
                adapter=alias.adapter,
                target=alias.target,
                error=_name_problem(alias.model, alias.adapter),
            )
        )
    return entries


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder (``HF_HUB_CACHE``, ``HF_HOME``...), as huggingface_hub resolves it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# -- sources ---------------------------------------------------------------------------------------------


def _cache_models(cache: Path, problems: list[str]) -> Iterator[ModelEntry]:
    """The cached models (adapter repos left out)."""
    for entry in _cache_entries(cache, problems):
        if isinstance(entry, ModelEntry):
            yield entry


def _cache_entries(cache: Path, problems: list[str]) -> Iterator[ModelEntry | AdapterEntry]:
    """One entry per cached snapshot of a model or adapter repo: ``org/name`` for the one ``main`` points
    at, else ``org/name@revision`` (both are ids ``--model`` takes)."""
    try:
        repos = sorted(os.scandir(cache), key=lambda e: e.name)
    except FileNotFoundError:
        return
    except OSError as exc:
        problems.append(f"cannot read the Hugging Face cache {cache}: {exc.strerror or exc}")
        return
    for repo in repos:
        if not repo.name.startswith("models--") or not repo.is_dir():
            continue
        repo_id = repo.name.removeprefix("models--").replace("--", "/")
        folder = Path(repo.path)
        main = _main_ref(folder)
        try:
            snapshots = sorted(p for p in (folder / "snapshots").iterdir() if p.is_dir())
        except OSError:
            snapshots = []
        if not snapshots:
            yield ModelEntry(
                id=repo_id,
                source=HF_CACHE,
                path=str(folder),
                repo_id=repo_id,
                error="no snapshot in the cache (an interrupted download?)",
            )
            continue
        for snapshot in snapshots:
            revision = snapshot.name
            entry_id = repo_id if main == revision else f"{repo_id}@{revision}"
            if _is_adapter_dir(snapshot) and not (snapshot / CONFIG_FILE).is_file():
                yield replace(_adapter(snapshot), name=entry_id)  # an adapter repo (`mlxman pull`)
                continue
            yield ModelEntry(
                id=entry_id, source=HF_CACHE, path=str(snapshot), repo_id=repo_id, revision=revision
            )


def _main_ref(folder: Path) -> str | None:
    """The revision ``refs/main`` names (a 40-hex commit), None when there is none or it cannot be read."""
    try:
        text = read_bounded(folder / "refs" / "main", REF_MAX_BYTES, "a cache ref").decode().strip()
    except (FileProblem, UnicodeDecodeError):
        return None
    return text or None


def _folder_entries(root: Path, problems: list[str]) -> tuple[list[ModelEntry], list[AdapterEntry]]:
    """Models and adapters in ``root`` (itself one, or folders under it, up to MAX_DEPTH deep)."""
    models: list[ModelEntry] = []
    adapters: list[AdapterEntry] = []
    problem = path_problem(root, want_dir=True)
    if problem is not None:
        problems.append(f"model folder {root} {problem}")
        return models, adapters
    seen = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        seen += 1
        if seen > MAX_FOLDERS_PER_ROOT:
            problems.append(f"model folder {root} has over {MAX_FOLDERS_PER_ROOT:,} folders; listed part")
            break
        if _is_adapter_dir(folder):
            adapters.append(_adapter(folder))
            continue
        if (folder / CONFIG_FILE).is_file():
            path = folder.resolve()
            models.append(ModelEntry(id=str(path), source=FOLDER, path=str(path)))
            continue
        if depth >= MAX_DEPTH:
            continue
        try:
            children = sorted(
                (Path(e.path) for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir()),
                reverse=True,
            )
        except OSError as exc:
            problems.append(f"cannot read {folder}: {exc.strerror or exc}")
            continue
        stack.extend((child, depth + 1) for child in children)
    return models, adapters


def _is_adapter_dir(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG_FILE).is_file()


def _dedupe(models: list[ModelEntry]) -> list[ModelEntry]:
    """A folder listed by two overlapping roots (or a cache snapshot under a model folder) once."""
    seen: set[str] = set()
    kept = []
    for model in models:
        key = model.path or model.id
        if key not in seen:
            seen.add(key)
            kept.append(model)
    return kept


# -- describing one entry --------------------------------------------------------------------------------


def _describe(entry: ModelEntry, budget_bytes: int, context_tokens: int) -> ModelEntry:
    """Fill in what config.json and the safetensors headers say; a problem becomes ``error``."""
    from mlxman.pool.estimate import model_context, model_footprint
    from mlxman.pool.kinds import detect_kind

    assert entry.path is not None
    path = Path(entry.path)
    try:
        config = read_json_object(path / CONFIG_FILE, CONFIG_MAX_BYTES, "a model config")
        kind = detect_kind(path, config)
        headers = _headers(path)
        context = model_context(config, context_tokens)
        footprint = model_footprint(path, config, kind, context)
    except (FileProblem, ValueError, MlxmanError, OSError) as exc:
        return replace(entry, size_bytes=_folder_bytes(path), error=_reason(exc, CONFIG_FILE))
    quantization = _quantization(config)
    return replace(
        entry,
        kind=kind,
        architecture=_architecture(config),
        parameters=_parameters(headers, config),
        dtype=_dtype(headers),
        quantization=quantization,
        size_bytes=_folder_bytes(path),
        estimate_bytes=footprint.total_bytes,
        context_tokens=context,
        fits=footprint.total_bytes <= budget_bytes,
    )


def _reason(exc: BaseException, file: str) -> str:
    if isinstance(exc, MlxmanError):
        return exc.message
    if isinstance(exc, (FileProblem, HeaderError)):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    return f"{file} {exc}"


def _headers(path: Path) -> list[SafetensorsHeader]:
    from mlxman.pool.estimate import model_headers

    return model_headers(path)


def _architecture(config: dict[str, Any]) -> str | None:
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) and model_type else None


def _quantization(config: dict[str, Any]) -> str | None:
    """``4-bit`` (mlx-lm's ``quantization`` block, group size when not the default 64), else None."""
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict):
        return None
    bits, group = quant.get("bits"), quant.get("group_size")
    if not isinstance(bits, int) or isinstance(bits, bool):
        mode = quant.get("mode") or quant.get("quant_method")
        return str(mode) if isinstance(mode, str) else "quantized"
    return f"{bits}-bit" + (f" g{group}" if isinstance(group, int) and group != 64 else "")


def _dtype(headers: list[SafetensorsHeader]) -> str | None:
    """The float dtype holding most weight bytes (a quantized model's: its scales')."""
    by_dtype: dict[str, int] = {}
    for header in headers:
        for tensor in header.tensors.values():
            if tensor.dtype in _DTYPE_NAMES:
                by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + tensor.nbytes
    if not by_dtype:
        return None
    return _DTYPE_NAMES[max(by_dtype, key=lambda d: by_dtype[d])]


def _parameters(headers: list[SafetensorsHeader], config: dict[str, Any]) -> int:
    """Parameters before quantization: a packed U32 weight holds 32/bits of them per element; its scales and
    biases are not parameters."""
    tensors = {name: t for h in headers for name, t in h.tensors.items()}
    quant = config.get("quantization")
    default_bits = quant.get("bits") if isinstance(quant, dict) else None
    total = 0
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        weight = tensors.get(f"{module}.weight")
        if leaf in ("scales", "biases") and weight is not None and weight.dtype == "U32":
            continue
        if tensor.dtype == "U32" and f"{module}.scales" in tensors:
            bits = _module_bits(quant, module, default_bits, tensor, tensors[f"{module}.scales"])
            total += tensor.numel * 32 // bits if bits else tensor.numel
        else:
            total += tensor.numel
    return total


def _module_bits(quant: Any, module: str, default: Any, weight: TensorInfo, scales: TensorInfo) -> int | None:
    own = quant.get(module) if isinstance(quant, dict) else None
    if isinstance(own, dict) and isinstance(own.get("bits"), int):
        return int(own["bits"])
    if isinstance(default, int) and not isinstance(default, bool) and default > 0:
        return default
    group = quant.get("group_size", 64) if isinstance(quant, dict) else 64
    if weight.shape and scales.shape and isinstance(group, int) and group > 0:
        return max(1, weight.shape[-1] * 32 // max(1, scales.shape[-1] * group))
    return None


def _folder_bytes(path: Path) -> int | None:
    """Bytes of the files in ``path`` (after symlinks: a cache snapshot's files are links to blobs)."""
    total = 0
    try:
        for dirpath, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    continue
    except OSError:
        return None
    return total


def _adapter(folder: Path) -> AdapterEntry:
    from mlxman.adapters.info import adapter_info

    path = folder.resolve()
    try:
        info = adapter_info(path)
    except (MlxmanError, FileProblem, ValueError, OSError) as exc:
        return AdapterEntry(
            name=folder.name,
            path=str(path),
            base=_recorded_base(path),
            size_bytes=_folder_bytes(path),
            error=_reason(exc, ADAPTER_CONFIG_FILE),
        )
    return AdapterEntry(
        name=folder.name,
        path=str(path),
        base=info.base_model,
        format=info.format,
        fine_tune_type=info.fine_tune_type,
        rank=info.rank,
        parameters=info.parameters,
        size_bytes=_folder_bytes(path),
        estimate_bytes=info.bytes,
    )


def _recorded_base(path: Path) -> str | None:
    """The base a broken adapter's config still names, if that much can be read."""
    try:
        config = read_json_object(path / ADAPTER_CONFIG_FILE, CONFIG_MAX_BYTES, "an adapter config")
    except (FileProblem, ValueError, OSError):
        return None
    base = config.get("model") or config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


# -- putting it together ---------------------------------------------------------------------------------


def _attach(
    models: list[ModelEntry], adapters: list[AdapterEntry], names: list[NameEntry]
) -> list[ModelEntry]:
    """Each adapter under the model its config names (a path or a Hugging Face id), bases that adapters name
    but that are not here as ``missing`` entries; names on the model they stand for."""
    models = list(models)
    keys: dict[str, int] = {}
    for i, model in enumerate(models):
        for key in _model_keys(model):
            keys.setdefault(key, i)
    under: dict[int, list[AdapterEntry]] = {}
    missing: dict[str, list[AdapterEntry]] = {}
    # A base recorded as a name (`mlxman alias`) is the model that name stands for.
    by_name = {n.name: normal_spec(n.model) for n in names if n.adapter is None}
    for adapter in adapters:
        wanted = _base_keys(adapter) + ([by_name[adapter.base]] if adapter.base in by_name else [])
        index = next((keys[k] for k in wanted if k in keys), None)
        base = _base_folder(adapter) if index is None else None
        if base is not None:
            # A base folder outside the model folders is still on this machine: `--model` takes it.
            models.append(ModelEntry(id=base, source=FOLDER, path=base))
            index = len(models) - 1
            for key in _model_keys(models[index]):
                keys.setdefault(key, index)
        if index is None:
            missing.setdefault(adapter.base or "", []).append(adapter)
        else:
            under.setdefault(index, []).append(adapter)
    named: dict[int, list[str]] = {}
    for name in names:
        index = keys.get(normal_spec(name.model))
        if index is not None and name.adapter is None:
            named.setdefault(index, []).append(name.name)
    result = [
        replace(
            m,
            adapters=tuple(sorted(under.get(i, []), key=lambda a: a.name)),
            names=tuple(named.get(i, [])),
        )
        for i, m in enumerate(models)
    ]
    for base, orphans in sorted(missing.items()):
        result.append(
            ModelEntry(
                id=base or "(base not recorded)",
                source=MISSING_BASE,
                adapters=tuple(sorted(orphans, key=lambda a: a.name)),
                error=(
                    "not on this machine: the base these adapters name"
                    if base
                    else "these adapters do not record their base model"
                ),
            )
        )
    return result


def _base_keys(adapter: AdapterEntry) -> list[str]:
    """What an adapter's recorded base may match: the id or path as written, and a relative path taken from
    the adapter's own folder (mlx-lm records ``--model`` as it was typed)."""
    if not adapter.base:
        return []
    keys = [normal_spec(adapter.base)]
    if not adapter.base.startswith(("/", "~")):
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            keys.append(str((Path(adapter.path).parent / adapter.base).resolve()))
    return keys


def _base_folder(adapter: AdapterEntry) -> str | None:
    """The model folder an adapter's recorded base names, when it is one on this machine."""
    for key in _base_keys(adapter):
        if key.startswith("/") and (Path(key) / CONFIG_FILE).is_file():
            return key
    return None


def _built_demo_kit() -> Path | None:
    from mlxman.demo.kit import kit_root

    root = kit_root()
    return root if exists(root / "MANIFEST.json") else None


def _covers(folder: Path, path: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.expanduser().resolve())
    except (OSError, RuntimeError, ValueError):
        return False


def _model_keys(model: ModelEntry) -> Iterable[str]:
    yield normal_spec(model.id)
    if model.repo_id and model.source == HF_CACHE and "@" not in model.id:
        yield normal_spec(model.repo_id)
    if model.path:
        yield normal_spec(model.path)


def normal_spec(spec: str | None) -> str:
    """A path resolved (so links and ``..`` agree), a Hugging Face id as it is: how keys spell a base."""
    if not spec:
        return ""
    if spec.startswith(("/", "~", ".")):
        try:
            return str(Path(spec).expanduser().resolve())
        except (OSError, RuntimeError, ValueError):
            return spec
    return spec


def _wanted(model: ModelEntry, kind: str | None, match: str | None) -> bool:
    if kind is not None and model.kind != kind:
        return False
    if not match:
        return True
    words = [model.id, Path(model.path).name if model.path else "", *model.names]
    words += [a.name for a in model.adapters]
    return any(match.lower() in w.lower() for w in words)


def _name_problem(model: str, adapter: str | None) -> str | None:
    """Why a name no longer works, checked on disk only (a cached id: its repo folder in the cache)."""
    if model.startswith("/"):
        if not (Path(model) / CONFIG_FILE).is_file():
            return f"its model {model} is gone"
    elif not (hf_cache_dir() / ("models--" + model.replace("/", "--"))).is_dir():
        return f"its model {model} is not in the Hugging Face cache"
    if adapter is not None and not _is_adapter_dir(Path(adapter)):
        return f"its adapter {adapter} is gone"
    return None
