"""``mlxman status``: the machine, MLX, the pool budget, and the running server's memory at a glance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rich.markup import escape
from rich.table import Table

from mlxman.cli.options import ApiKeyEnvOption, HostOption, JsonOption, MemoryLimitOption
from mlxman.client import Address
from mlxman.memory import Budget, format_bytes, resolve_budget
from mlxman.output import out
from mlxman.settings import API_KEY_ENV, load_config, user_dir
from mlxman.system import MachineInfo, MlxInfo, machine_info, mlx_info

ServerState = Literal["running", "none", "needs_key", "key_refused", "error"]


@dataclass(frozen=True)
class ServerReport:
    """The server at ``address``: whether one answers, and its process's MLX memory, RSS and threads."""

    address: str
    state: ServerState
    process: dict[str, Any] | None = None
    detail: str | None = None


@dataclass(frozen=True)
class StatusReport:
    machine: MachineInfo
    mlx: MlxInfo
    budget: Budget
    user_dir: str
    config_file: str | None
    server: ServerReport
    pool: dict[str, Any] | None = None


def collect(
    memory_limit: str | None, host: str | None = None, api_key_env: str | None = None
) -> StatusReport:
    from mlxman.client import api_key_from_env, server_address

    machine = machine_info()
    config = load_config()
    budget = resolve_budget(memory_limit, config, machine.memory.total)
    server, pool = _ask_server(server_address(host), api_key_from_env(api_key_env))
    return StatusReport(
        machine=machine,
        mlx=mlx_info(),
        budget=budget,
        user_dir=str(user_dir()),
        config_file=str(config.path) if config.exists else None,
        server=server,
        pool=pool,
    )


def _ask_server(address: Address, api_key: str | None) -> tuple[ServerReport, dict[str, Any] | None]:
    """The server's counters and pool: MLX counters mean something only in the process holding models."""
    from mlxman.client import PROBE_TIMEOUT, PoolClient, ServerAuthError, is_listening
    from mlxman.errors import ServerError

    url = address.url
    if not is_listening(address, PROBE_TIMEOUT):
        return ServerReport(url, "none"), None
    client = PoolClient(address, api_key, timeout=2.0)
    try:
        pool = client.status()
        process = client.server()
    except ServerAuthError:
        return ServerReport(url, "key_refused" if api_key else "needs_key"), None
    except ServerError as exc:
        return ServerReport(url, "error", detail=exc.message), None
    return ServerReport(url, "running", process), {"running": True, "address": url, **pool}


def _server_rows(server: ServerReport) -> list[tuple[str, str]]:
    key_hint = f"(${API_KEY_ENV}, or --api-key-env NAME)"
    if server.state == "none":
        return [("Server", f"none running at {server.address} (start one with `mlxman serve`)")]
    if server.state == "needs_key":
        return [("Server", f"{server.address} needs an API key {key_hint}")]
    if server.state == "key_refused":
        return [("Server", f"{server.address} refused the API key sent {key_hint}")]
    if server.state == "error" or server.process is None:
        return [("Server", f"at {server.address}, not answering as mlxman: {server.detail}")]
    p, x = server.process, server.process.get("mlx") or {}
    return [
        (
            "Server",
            f"{server.address}, pid {p['pid']}, mlxman {p['version']}, up {_duration(p['uptime_seconds'])}",
        ),
        (
            "Server MLX",
            f"active {format_bytes(x['active_memory'])}, peak {format_bytes(x['peak_memory'])}, "
            f"cache {format_bytes(x['cache_memory'])}, limit {format_bytes(x['memory_limit'])}",
        ),
        ("Server process", f"RSS {format_bytes(p['rss_bytes'])}, {p['threads']} threads"),
    ]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def render(report: StatusReport) -> None:
    m, x, b = report.machine, report.mlx, report.budget
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="key")
    grid.add_column()
    grid.add_row("Machine", f"{m.os} {m.os_release} {m.arch}, {m.cpu_count} CPUs, Python {m.python}")
    grid.add_row(
        "RAM",
        f"{format_bytes(m.memory.total)} total, {format_bytes(m.memory.available)} available, "
        f"{format_bytes(m.memory.used)} used",
    )
    if x.error:
        grid.add_row("MLX", f"[error]unusable[/error] ({escape(x.error)})")
    else:
        grid.add_row("MLX", f"{x.version} on {x.device}")
    grid.add_row("Pool budget", f"{format_bytes(b.limit_bytes)} ({b.spec}, from {b.source})")
    grid.add_row("User dir", report.user_dir)
    grid.add_row("Config", report.config_file or "none")
    for name, value in _server_rows(report.server):
        grid.add_row(name, escape(value))
    out.show(grid)
    if report.pool is not None:
        from mlxman.cli.pool import render_pool

        out.text(f"\nPool of the server at {report.server.address}")
        render_pool(report.pool, f"server {report.server.address}")


def status(
    host: HostOption = None,
    api_key_env: ApiKeyEnvOption = None,
    json_output: JsonOption = False,
    memory_limit: MemoryLimitOption = None,
) -> None:
    """Show the machine, MLX, the pool budget, and a running server's MLX memory, threads and pool."""
    report = collect(memory_limit, host, api_key_env)
    if json_output:
        out.json(report)
    else:
        render(report)
