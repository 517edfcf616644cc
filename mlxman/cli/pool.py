"""``mlxman pool``: show and steer a running server's pool; estimate a load with or without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mlxman.cli.options import ApiKeyEnvOption, JsonOption, MemoryLimitOption
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
from mlxman.memory import Budget, format_bytes, resolve_budget, system_memory
from mlxman.output import out
from mlxman.settings import HOST_ENV, load_config

app = typer.Typer(
    help="Show and steer the pool of a running `mlxman serve` (like `ollama ps` / `lms ps`).",
    no_args_is_help=True,
)

HostOption = Annotated[
    Optional[str],
    typer.Option("--host", help=f"Server address, host:port (default: ${HOST_ENV}, else 127.0.0.1:11435)."),
]
KeyArgument = Annotated[
    str, typer.Argument(help="MODEL or MODEL::ADAPTER, or the NAME `pool status` shows for it.")
]
SEPARATOR = "::"


def local_spec(spec: str) -> str:
    """Make local paths absolute (the server may run in another directory); other names pass unchanged."""
    parts = spec.split(SEPARATOR, 1)
    fixed = [str(Path(p).expanduser().resolve()) if p and _is_local(p) else p for p in parts]
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


def _budget() -> Budget:
    return resolve_budget(None, load_config(), system_memory().total)


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
    measured = entry.get("measured_bytes")
    estimated = format_bytes(entry["estimated_bytes"])
    return estimated if measured is None else f"{estimated} / {format_bytes(measured)}"


def short_names(keys: list[str]) -> dict[str, str]:
    """Keys shown by their last path parts (``text-model::colors``); full keys where two would look alike."""

    def short(key: str) -> str:
        return SEPARATOR.join(Path(p).name if "/" in p or "\\" in p else p for p in key.split(SEPARATOR, 1))

    names = {key: short(key) for key in keys}
    taken = list(names.values())
    return {key: name if taken.count(name) == 1 else key for key, name in names.items()}


def render_pool(status: dict[str, Any], where: str) -> None:
    """The pool as ``ollama ps`` shows its models: one row per entry, then totals against the budget."""
    entries = status.get("entries", [])
    names = short_names([e["key"] for e in entries])
    rows = [
        [
            escape(names[e["key"]]),
            e["kind"] if e.get("parent") is None else "adapter",
            _size(e),
            str(len(e.get("adapters") or [])) if e.get("parent") is None else "-",
            "yes" if e.get("pinned") else "no",
            str(e.get("in_use", 0)),
            _until(e),
        ]
        for e in entries
    ]
    if rows:
        # Names fold rather than end in "…": they are what `pool unload` and `pool pin` take.
        table = Table(box=None, header_style="title", pad_edge=False, collapse_padding=True)
        table.add_column("NAME", overflow="fold")
        for column in ("KIND", "SIZE (EST / MEASURED)", "ADAPTERS", "PINNED", "IN USE", "UNTIL"):
            table.add_column(column, no_wrap=True)
        for row in rows:
            table.add_row(*row)
        out.show(table)
    else:
        out.text("The pool is empty.")
    budget = status.get("budget") or {}
    source = f" ({budget['spec']}, from {budget['source']})" if budget.get("spec") else ""
    out.text(
        f"Used {format_bytes(status['used_bytes'])} of {format_bytes(status['budget_bytes'])}{source}, "
        f"{format_bytes(status['free_bytes'])} free; "
        f"{status['model_count']} of {status['max_models']} models; "
        f"machine has {format_bytes(status['available_bytes'])} available; {where}"
    )


@app.command("status")
def status(
    host: HostOption = None, api_key_env: ApiKeyEnvOption = None, json_output: JsonOption = False
) -> None:
    """Show what the server's pool holds; with no server, say so and show the budget a pool would have."""
    address = server_address(host)
    pool = running_pool(address, api_key=api_key_from_env(api_key_env))
    if pool is None:
        budget = _budget()
        if json_output:
            out.json({"running": False, "address": address.url, "budget": budget})
            return
        out.info(f"No mlxman server is running at {address}.")
        out.hint("Start one with `mlxman serve`.")
        limit = format_bytes(budget.limit_bytes)
        out.text(f"A pool would have a budget of {limit} ({budget.spec}, from {budget.source}).")
        return
    if json_output:
        out.json({"running": True, "address": address.url, **pool})
        return
    render_pool(pool, f"server {address}")


@app.command("load")
def load(
    model: Annotated[
        str, typer.Argument(help="Model directory or cached Hugging Face id, or MODEL::ADAPTER.")
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
    """A name from the `pool status` table back to its key; paths made absolute; anything else as typed."""
    spec = local_spec(key)
    if spec != key:
        return spec
    keys = [e["key"] for e in client.status().get("entries", [])]
    matches = [k for k, name in short_names(keys).items() if name == key]
    return matches[0] if len(matches) == 1 else key


@app.command("estimate")
def estimate(
    model: Annotated[str, typer.Argument(help="Model directory or cached Hugging Face id.")],
    adapter: Annotated[
        Optional[list[str]], typer.Option("--adapter", "-a", help="Adapter to load on it (repeatable).")
    ] = None,
    memory_limit: MemoryLimitOption = None,
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
) -> None:
    """What loading would take (weights, adapters, KV headroom), whether it fits, and what it would evict.

    Asks the running server if any; without one, or with --memory-limit, answers here for an empty pool.
    """
    adapters = [local_spec(a) for a in adapter or []]
    address = server_address(host)
    result: dict[str, Any] | None = None
    source = f"server {address}"
    if memory_limit is None and is_listening(address):
        result = PoolClient(address, api_key_from_env(api_key_env)).estimate(local_spec(model), adapters)
    if result is None:
        result = _estimate_here(local_spec(model), adapters, memory_limit)
        source = "an empty pool (no server asked)"
    if json_output:
        out.json({**result, "source": source})
    else:
        render_estimate(result, source)


def _estimate_here(model: str, adapters: list[str], memory_limit: str | None) -> dict[str, Any]:

    from mlxman.pool import ModelPool

    budget = resolve_budget(memory_limit, load_config(), system_memory().total)
    found = ModelPool(budget.limit_bytes).estimate(model, adapters)
    return found.as_dict()


def render_estimate(e: dict[str, Any], source: str) -> None:
    verdict = "[ok]yes[/ok]" if e["fits"] else f"[error]no[/error] ({e.get('reason') or 'does not fit'})"
    rows = [
        ("Key", f"{escape(e['key'])} ({e['kind']})"),
        ("Weights", format_bytes(e["weights_bytes"])),
        ("Adapters", format_bytes(e["adapters_bytes"])),
        ("KV headroom", format_bytes(e["kv_bytes"])),
        ("Needs", format_bytes(e["needed_bytes"])),
        ("Pool", f"limit {format_bytes(e['limit_bytes'])}, {format_bytes(e['in_use_bytes'])} in use"),
        ("Machine", f"{format_bytes(e['available_bytes'])} available"),
        ("Resident", escape(", ".join(e.get("resident") or [])) or "none"),
        ("Would evict", escape(", ".join(e.get("would_evict") or [])) or "nothing"),
        ("Fits", verdict),
        ("Asked", source),
    ]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="key")
    grid.add_column()
    for name, value in rows:
        grid.add_row(name, value)
    out.show(grid)
