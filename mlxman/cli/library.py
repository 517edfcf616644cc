"""``mlxman ls``: the models and adapters on this machine, like ``ollama list``."""

from __future__ import annotations

import os
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from mlxman.cli.options import ContextOption, JsonOption, MemoryLimitOption
from mlxman.errors import UsageError
from mlxman.library.catalog import MISSING_BASE, AdapterEntry, Library, ModelEntry, scan
from mlxman.memory import format_bytes
from mlxman.output import out
from mlxman.pool.kinds import KINDS
from mlxman.settings import MODEL_DIRS_ENV

MODEL_COLUMNS = ("NAME", "KIND", "ARCH", "PARAMS", "DTYPE", "SIZE", "ESTIMATE", "FITS")
ADAPTER_COLUMNS = ("ADAPTER", "BASE", "TYPE", "RANK", "PARAMS", "SIZE", "ESTIMATE")
BROKEN = "broken"


def ls(
    match: Annotated[
        Optional[str], typer.Argument(help="Show only entries whose name, folder or adapter contains this.")
    ] = None,
    kind: Annotated[
        Optional[str], typer.Option("--kind", help=f"Show only models of this kind: {', '.join(KINDS)}.")
    ] = None,
    adapters: Annotated[
        bool, typer.Option("--adapters", help="List the adapters alone, each with the base it belongs to.")
    ] = False,
    json_output: JsonOption = False,
    memory_limit: MemoryLimitOption = None,
    context_length: ContextOption = None,
) -> None:
    """List the models and adapters on this machine: kind, size, memory estimate, and whether each fits."""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"Unknown model kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    library = scan(kind=kind, match=match, memory_limit=memory_limit, context_length=context_length)
    if adapters:
        rows = [(model, adapter) for model in library.models for adapter in model.adapters]
        if json_output:
            out.json([{**_plain(adapter), "base_id": model.id} for model, adapter in rows])
        else:
            _render_adapters(rows)
            _footer(library, bool(rows))
        return
    if json_output:
        out.json(library)
        return
    _render_models(library)
    _footer(library, bool(library.models or library.names))


def _plain(adapter: AdapterEntry) -> dict[str, Any]:
    from mlxman.output import to_jsonable

    return dict(to_jsonable(adapter))


def _render_models(library: Library) -> None:
    rows: list[tuple[Any, ...]] = []
    for model in library.models:
        rows.append(_model_row(model))
        rows.extend(_adapter_row(adapter) for adapter in model.adapters)
    if rows:
        _table(MODEL_COLUMNS, rows)
    broken = [(m.id, m.error) for m in library.models if m.error and m.source != MISSING_BASE]
    broken += [(f"{m.id} :: {a.name}", a.error) for m in library.models for a in m.adapters if a.error]
    missing = [m for m in library.models if m.source == MISSING_BASE]
    if broken:
        out.text("\nBroken (listed, not usable):")
        for name, reason in broken:
            out.text(f"  {_shown(name)}: {reason}")
    if missing:
        out.text("\nAdapters whose base is not here:")
        for model in missing:
            out.text(f"  {_shown(model.id)}: {', '.join(a.name for a in model.adapters)}")
    if library.names:
        out.text("")
        _table(
            ("NAME", "STANDS FOR", "STATE"),
            [(n.name, _shown(n.target), n.error or "ok") for n in library.names],
        )


def _model_row(model: ModelEntry) -> tuple[Any, ...]:
    name = _shown(model.id) + (f" ({', '.join(model.names)})" if model.names else "")
    if model.source == MISSING_BASE:
        return (name, "missing", None, None, None, None, None, None)
    if model.error:
        return (name, BROKEN, None, None, None, _size(model.size_bytes), None, None)
    dtype = model.quantization or model.dtype
    fits = None if model.fits is None else "yes" if model.fits else "no"
    return (
        name,
        model.kind,
        model.architecture,
        _count(model.parameters),
        dtype,
        _size(model.size_bytes),
        _size(model.estimate_bytes),
        fits,
    )


def _adapter_row(adapter: AdapterEntry) -> tuple[Any, ...]:
    name = f"  └ {adapter.name}"
    if adapter.error:
        return (name, f"adapter ({BROKEN})", None, None, None, _size(adapter.size_bytes), None, None)
    what = " ".join(p for p in (adapter.fine_tune_type, f"r{adapter.rank}" if adapter.rank else None) if p)
    return (
        name,
        "adapter",
        what,
        _count(adapter.parameters),
        None,
        _size(adapter.size_bytes),
        _size(adapter.estimate_bytes),
        None,
    )


def _render_adapters(rows: list[tuple[ModelEntry, AdapterEntry]]) -> None:
    if not rows:
        return
    _table(
        ADAPTER_COLUMNS,
        [
            (
                adapter.name,
                _shown(model.id) + (" (missing)" if model.source == MISSING_BASE else ""),
                BROKEN if adapter.error else adapter.fine_tune_type,
                adapter.rank,
                _count(adapter.parameters),
                _size(adapter.size_bytes),
                _size(adapter.estimate_bytes),
            )
            for model, adapter in rows
        ],
    )
    for _model, adapter in rows:
        if adapter.error:
            out.text(f"{adapter.name}: {adapter.error}")


def _table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    """``out.table``'s style, but nothing is cut to the terminal's width (a name is what ``--model`` takes):
    like ``ollama list``, a long row runs on, and stays one line when piped."""
    from rich.cells import cell_len
    from rich.table import Table

    cells = [tuple("-" if v is None else str(v) for v in row) for row in rows]
    table = Table(box=None, header_style="title", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    for row in cells:
        table.add_row(*(escape(text) for text in row))  # folder names are data, not markup
    widths = [max(cell_len(text) for text in column) for column in zip(columns, *cells, strict=True)]
    console = out.stdout
    wide = console.width
    console.width = max(wide, sum(widths) + 2 * (len(widths) - 1))
    try:
        console.print(table)
    finally:
        console.width = wide


def _footer(library: Library, found: bool) -> None:
    """Narration on stderr: the budget the fit is judged by, where ls looked, and how to add more."""
    budget = format_bytes(library.budget_bytes)
    out.hint(
        f"Fits: estimate (weights + KV cache for up to {library.context_tokens:,} tokens) within the "
        f"{budget} pool budget ({library.budget_source})."
    )
    for problem in library.problems:
        out.warn(problem)
    where = ", ".join(_shown(d) for d in library.model_dirs) or "none"
    if not found:
        out.hint(
            "No models found. Fetch one with `mlxman pull ORG/NAME`, or list your model folders in "
            f'config.toml (model_dirs = ["~/models"]) or ${MODEL_DIRS_ENV}.'
        )
    out.hint(f"Looked in the Hugging Face cache ({_shown(library.hf_cache)}) and model folders: {where}.")


def _shown(path: str) -> str:
    """A path with the home folder as ``~`` (plain text: tables and hints escape what they print)."""
    home = os.path.expanduser("~")
    return "~" + path[len(home) :] if home not in ("", "/") and path.startswith(home + "/") else path


def _size(n: int | None) -> str | None:
    return None if n is None else format_bytes(n)


def _count(n: int | None) -> str | None:
    """Parameters as models are named: 494.0M, 7.6B."""
    if n is None:
        return None
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
