"""``mlxman pool``: show and steer a running server's pool; estimate a load with or without a server."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.cells import cell_len
from rich.markup import escape
from rich.table import Table

from mlxman.cli.options import ApiKeyEnvOption, ContextOption, HostOption, JsonOption, MemoryLimitOption
from mlxman.client import (
    PROBE_TIMEOUT,
    Address,
    PoolClient,
    ServerAuthError,
    api_key_from_env,
    is_listening,
    server_address,
)
from mlxman.errors import ServerError
from mlxman.files import exists, path_problem
from mlxman.library.aliases import lookup as lookup_alias
from mlxman.memory import Budget, format_bytes, resolve_budget, system_memory
from mlxman.output import out
from mlxman.settings import PoolLimits, load_config, resolve_pool_limits

app = typer.Typer(
    help="Show and steer the pool of a running `mlxman serve` (like `ollama ps` / `lms ps`).",
    no_args_is_help=True,
)

KeyArgument = Annotated[
    str,
    typer.Argument(help="MODEL or MODEL::ADAPTER, the NAME `pool status` shows for it, or an `alias` name."),
]
SEPARATOR = "::"
# Names longer than the table leaves room for are cut in the middle: both ends tell entries apart.
ELLIPSIS = "…"
NAME_MIN_WIDTH = 16
NAME_PART_MIN_WIDTH = 8
COLUMNS = ("NAME", "KIND", "SIZE", "CONTEXT", "PINNED", "IN USE", "UNTIL")
ALIAS_COLUMN = "ALIAS"


def local_spec(spec: str) -> str:
    """Make local paths absolute (the server may run in another directory); other names, and names of
    `mlxman alias` (which win over a folder of the same name here), pass unchanged."""
    parts = spec.split(SEPARATOR, 1)
    named = lookup_alias(parts[0]) is not None
    fixed = [
        str(Path(p).expanduser().resolve()) if p and _is_local(p) and not (named and i == 0) else p
        for i, p in enumerate(parts)
    ]
    return SEPARATOR.join(fixed)


def _is_local(part: str) -> bool:
    """A path on this machine (``Path.exists`` raises on a name too long, and resolve on a symlink loop)."""
    path = Path(part).expanduser()
    return exists(path) and path_problem(path) != "is a symlink loop"


def running_pool(
    address: Address, timeout: float = PROBE_TIMEOUT, api_key: str | None = None
) -> dict[str, Any] | None:
    """The pool of the server at ``address``, or None when none answers; a server that wants a key says so."""
    if not is_listening(address, timeout):
        return None
    try:
        return PoolClient(address, api_key, timeout=max(timeout, 2.0)).status()
    except ServerAuthError:
        raise
    except ServerError:
        return None


def _budget() -> tuple[Budget, PoolLimits]:
    config = load_config()
    return resolve_budget(None, config, system_memory().total), resolve_pool_limits(None, None, config)


def _until(entry: dict[str, Any]) -> str:
    if entry.get("in_use"):
        return "in use"
    seconds = entry.get("expires_in")
    if seconds is None or entry.get("pinned"):
        return "forever"
    seconds = int(seconds)
    if seconds < 60:
        return f"in {seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"in {minutes}m{seconds:02d}s"
    return f"in {minutes // 60}h{minutes % 60:02d}m"


def _size(entry: dict[str, Any]) -> str:
    """What the entry counts against the budget: its weights (the larger of estimate and measurement) + KV,
    and for a base served by the engine its adapter slots and the batch's KV beyond one context."""
    weights = max(entry["estimated_bytes"], entry.get("measured_bytes") or 0)
    kv = max(entry.get("kv_bytes", 0), entry.get("batch_kv_bytes", 0))
    return format_bytes(weights + entry.get("slot_bytes", 0) + kv)


def short_names(keys: list[str]) -> dict[str, str]:
    """Keys shown by their last path parts (``text-model::colors``); full keys where two would look alike."""

    def short(key: str) -> str:
        return SEPARATOR.join(Path(p).name if "/" in p or "\\" in p else p for p in key.split(SEPARATOR, 1))

    names = {key: short(key) for key in keys}
    taken = list(names.values())
    return {key: name if taken.count(name) == 1 else key for key, name in names.items()}


def fit_name(name: str, width: int) -> str:
    """``name`` in at most ``width`` cells, never folded: cut in the middle, the model's part first."""
    if cell_len(name) <= width:
        return name
    model, sep, adapter = name.partition(SEPARATOR)
    if not sep:
        return _cut(name, width)
    model = _cut(model, max(width - cell_len(sep + adapter), NAME_PART_MIN_WIDTH))
    return model + sep + _cut(adapter, max(width - cell_len(model + sep), NAME_PART_MIN_WIDTH))


def _cut(text: str, width: int) -> str:
    if cell_len(text) <= width:
        return text
    keep = max(width - 1, 2)
    head = keep // 2
    return text[:head] + ELLIPSIS + text[len(text) - (keep - head) :]


def render_pool(status: dict[str, Any], where: str) -> None:
    """The pool as ``ollama ps`` shows its models: one row per entry, then totals against the budget."""
    entries = status.get("entries", [])
    names = short_names([e["key"] for e in entries])
    rows = [
        [
            e["kind"] if e.get("parent") is None else "adapter",
            _size(e),
            str(e["context_tokens"]) if e.get("parent") is None and e.get("context_tokens") else "-",
            "yes" if e.get("pinned") else "no",
            str(e.get("in_use", 0)),
            _until(e),
        ]
        for e in entries
    ]
    headers: tuple[str, ...] = COLUMNS
    if any(e.get("names") for e in entries):
        # The `mlxman alias` names that stand for an entry, beside its own name.
        headers = (COLUMNS[0], ALIAS_COLUMN, *COLUMNS[1:])
        rows = [[", ".join(e.get("names") or []) or "-", *row] for e, row in zip(entries, rows, strict=True)]
    if rows:
        # One space between columns; what the other columns leave is the names' room.
        columns = zip(*[headers[1:], *rows], strict=True)
        others = sum(max(cell_len(c) for c in column) + 1 for column in columns)
        room = max(out.stdout.width - others, NAME_MIN_WIDTH)
        table = Table(box=None, header_style="title", pad_edge=False, padding=(0, 1, 0, 0))
        for column in headers:
            table.add_column(column, no_wrap=True)
        for e, row in zip(entries, rows, strict=True):
            table.add_row(escape(fit_name(names[e["key"]], room)), *(escape(c) for c in row))
        out.show(table)
    else:
        out.text("The pool is empty.")
    budget = status.get("budget") or {}
    source = f" ({budget['spec']}, from {budget['source']})" if budget.get("spec") else ""
    waiting = status.get("waiting") or 0
    lines = [
        f"Used {format_bytes(status['used_bytes'])} of {format_bytes(status['budget_bytes'])}{source}, "
        f"{format_bytes(status['free_bytes'])} free.",
        f"{status['model_count']} of at most {status['max_models']} models; context "
        f"{status['context_tokens']} tokens per model"
        + (f"; {waiting} request(s) waiting for memory." if waiting else "."),
        f"Machine has {format_bytes(status['available_bytes'])} available; {where}.",
    ]
    for line in lines:
        # Wrapped here, between words: the terminal would cut anywhere.
        out.text(escape(textwrap.fill(line, max(out.stdout.width, NAME_MIN_WIDTH), break_long_words=False)))
    if status.get("ranks"):
        _render_ranks(status["ranks"])


def _render_ranks(ranks: list[dict[str, Any]]) -> None:
    """A sharded model (`serve --hosts`): a row per rank and its machine."""
    table = Table(box=None, header_style="title", pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("RANK", "HOST", "WEIGHTS", "KV", "ADAPTER", "MLX ACTIVE", "BUDGET"):
        table.add_column(column, no_wrap=True)
    for r in ranks:
        cells = [r.get("weights_bytes"), r.get("kv_bytes"), r.get("adapter_bytes"), r.get("active_bytes")]
        table.add_row(
            str(r.get("rank", "-")),
            escape(str(r.get("host", "-"))),
            *(format_bytes(c) for c in cells),
            format_bytes(r.get("budget_bytes")),
        )
    out.show(table)


@app.command("status")
def status(
    host: HostOption = None, api_key_env: ApiKeyEnvOption = None, json_output: JsonOption = False
) -> None:
    """Show what the server's pool holds; with no server, say so and show the budget a pool would have."""
    address = server_address(host)
    pool = running_pool(address, api_key=api_key_from_env(api_key_env))
    if pool is None:
        budget, limits = _budget()
        if json_output:
            out.json({"running": False, "address": address.url, "budget": budget, "limits": limits})
            return
        out.info(f"No mlxman server is running at {address}.")
        out.hint("Start one with `mlxman serve`.")
        limit = format_bytes(budget.limit_bytes)
        out.text(f"A pool would have a budget of {limit} ({budget.spec}, from {budget.source}),")
        out.text(
            f"a context of {limits.context_tokens} tokens per model (from {limits.context_source}) "
            f"and at most {limits.max_models} models (from {limits.max_models_source})."
        )
        return
    if json_output:
        out.json({"running": True, "address": address.url, **pool})
        return
    render_pool(pool, f"server {address}")


@app.command("load")
def load(
    model: Annotated[
        str, typer.Argument(help="Model directory, cached Hugging Face id or name; or MODEL::ADAPTER.")
    ],
    adapter: Annotated[
        Optional[str], typer.Option("--adapter", "-a", help="Adapter directory to load on it.")
    ] = None,
    pin: Annotated[bool, typer.Option("--pin", help="Never evict or expire it until unpinned.")] = False,
    keep_alive: Annotated[
        Optional[str], typer.Option("--keep-alive", help="Idle time before it unloads: 5m, 0, -1 (never).")
    ] = None,
    kind: Annotated[
        Optional[str], typer.Option("--kind", help="Override kind detection: text, vision or embeddings.")
    ] = None,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Load a model (and adapter) into the server's pool without generating."""
    client = PoolClient(server_address(host), api_key_from_env(api_key_env))
    entry = client.load(
        local_spec(model), local_spec(adapter) if adapter else None, pin=pin, keep_alive=keep_alive, kind=kind
    )
    if json_output:
        out.json(entry)
        return
    pinned = ", pinned" if entry.get("pinned") else ""
    out.success(f"Loaded {entry['key']} ({entry['kind']}, {_size(entry)}{pinned})")


@app.command("unload")
def unload(
    key: KeyArgument,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Unload an entry (a base takes its adapters with it) and free its memory."""
    _keyed("unload", key, host, api_key_env, json_output, "Unloaded")


@app.command("pin")
def pin(
    key: KeyArgument,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Keep an entry resident: never evicted, never expired."""
    _keyed("pin", key, host, api_key_env, json_output, "Pinned")


@app.command("unpin")
def unpin(
    key: KeyArgument,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """Let an entry be evicted and expire again."""
    _keyed("unpin", key, host, api_key_env, json_output, "Unpinned")


def _keyed(
    action: str, key: str, host: str | None, api_key_env: str | None, json_output: bool, verb: str
) -> None:
    client = PoolClient(server_address(host), api_key_from_env(api_key_env))
    result = getattr(client, action)(_full_key(client, key))
    if json_output:
        out.json(result)
    else:
        out.success(f"{verb} {result['key']}")


def _full_key(client: PoolClient, key: str) -> str:
    """A name from the `pool status` table back to its key; paths made absolute; anything else (a name of
    `mlxman alias` first: the server resolves it) as typed."""
    spec = local_spec(key)
    if spec != key or lookup_alias(key) is not None:
        return spec
    keys = [e["key"] for e in client.status().get("entries", [])]
    return match_name(key, keys) or key


def match_name(name: str, keys: list[str]) -> str | None:
    """The one key ``name`` stands for in the table: its short name, or that name cut in the middle."""
    pattern = re.compile(".+".join(re.escape(part) for part in name.split(ELLIPSIS)), re.DOTALL)
    matches = [key for key, short in short_names(keys).items() if pattern.fullmatch(short) or key == name]
    return matches[0] if len(matches) == 1 else None


@app.command("estimate")
def estimate(
    model: Annotated[str, typer.Argument(help="Model directory, cached Hugging Face id, or name.")],
    adapter: Annotated[
        Optional[list[str]], typer.Option("--adapter", "-a", help="Adapter to load on it (repeatable).")
    ] = None,
    memory_limit: MemoryLimitOption = None,
    context_length: ContextOption = None,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """What loading would take (weights, adapters, KV headroom), whether it fits, and what it would evict.

    Asks the running server if any; without one, or with --memory-limit or --context-length, answers here
    for an empty pool.
    """
    adapters = [local_spec(a) for a in adapter or []]
    address = server_address(host)
    result: dict[str, Any] | None = None
    source = f"server {address}"
    if memory_limit is None and context_length is None and is_listening(address):
        result = PoolClient(address, api_key_from_env(api_key_env)).estimate(local_spec(model), adapters)
    if result is None:
        result = _estimate_here(local_spec(model), adapters, memory_limit, context_length)
        source = "an empty pool (no server asked)"
    if json_output:
        out.json({**result, "source": source})
    else:
        render_estimate(result, source)


def _estimate_here(
    model: str, adapters: list[str], memory_limit: str | None, context_length: int | None
) -> dict[str, Any]:
    from mlxman.pool import ModelPool

    config = load_config()
    budget = resolve_budget(memory_limit, config, system_memory().total)
    limits = resolve_pool_limits(context_length, None, config)
    pool = ModelPool(budget.limit_bytes, context_tokens=limits.context_tokens, max_models=limits.max_models)
    return pool.estimate(model, adapters).as_dict()


def render_estimate(e: dict[str, Any], source: str) -> None:
    verdict = "[ok]yes[/ok]" if e["fits"] else f"[error]no[/error] ({e.get('reason') or 'does not fit'})"
    resident = e.get("resident") or []
    base_resident = e["key"] in resident
    adapters_resident = len(resident) - base_resident
    context = e.get("context_tokens")
    rows = [
        ("Key", f"{escape(e['key'])} ({e['kind']})"),
        ("Weights", format_bytes(e["weights_bytes"]) + (" (resident)" if base_resident else "")),
        (
            "Adapters",
            format_bytes(e["adapters_bytes"])
            + (f" ({adapters_resident} resident)" if adapters_resident and e["adapters_bytes"] else ""),
        ),
        ("KV headroom", format_bytes(e["kv_bytes"]) + (f" for {context} tokens" if context else "")),
        (
            "Needs",
            format_bytes(e["needed_bytes"])
            + (f" more ({format_bytes(e['resident_bytes'])} resident)" if e.get("resident_bytes") else ""),
        ),
        ("Pool", f"limit {format_bytes(e['limit_bytes'])}, {format_bytes(e['in_use_bytes'])} in use"),
        ("Machine", f"{format_bytes(e['available_bytes'])} available"),
        ("Resident", escape(", ".join(short_names(resident).values())) or "none"),
        ("Would evict", escape(", ".join(short_names(e.get("would_evict") or []).values())) or "nothing"),
        ("Fits", verdict),
        ("Asked", source),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="key")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value)
    out.show(grid)
