"""``mlxman status``: the machine, MLX and the pool budget at a glance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from mlxman.cli.options import JsonOption, MemoryLimitOption
from mlxman.memory import Budget, format_bytes, resolve_budget
from mlxman.output import out
from mlxman.settings import load_config, user_dir
from mlxman.system import MachineInfo, MlxInfo, machine_info, mlx_info


@dataclass(frozen=True)
class StatusReport:
    machine: MachineInfo
    mlx: MlxInfo
    budget: Budget
    user_dir: str
    config_file: str | None
    server: str
    pool: dict[str, Any] | None = None


def collect(memory_limit: str | None) -> StatusReport:
    machine = machine_info()
    config = load_config()
    budget = resolve_budget(memory_limit, config, machine.memory.total)
    return StatusReport(
        machine=machine,
        mlx=mlx_info(),
        budget=budget,
        user_dir=str(user_dir()),
        config_file=str(config.path) if config.exists else None,
        **_server_pool(),
    )


def _server_pool() -> dict[str, Any]:
    """Where a server would answer ($MLXMAN_HOST or the default), and its pool when one does."""
    from mlxman.cli.pool import running_pool
    from mlxman.client import server_address

    address = server_address()
    pool = running_pool(address)
    running = None if pool is None else {"running": True, "address": address.url, **pool}
    return {"server": address.url, "pool": running}


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
        grid.add_row("MLX", f"[error]unusable[/error] ({x.error})")
    else:
        grid.add_row("MLX", f"{x.version} on {x.device}")
        grid.add_row(
            "MLX memory",
            f"active {format_bytes(x.active_memory)}, peak {format_bytes(x.peak_memory)}, "
            f"cache {format_bytes(x.cache_memory)}, limit {format_bytes(x.memory_limit)}",
        )
    grid.add_row("Pool budget", f"{format_bytes(b.limit_bytes)} ({b.spec}, from {b.source})")
    grid.add_row("User dir", report.user_dir)
    grid.add_row("Config", report.config_file or "none")
    grid.add_row("Server", report.server if report.pool is not None else f"none running at {report.server}")
    out.show(grid)
    if report.pool is not None:
        from mlxman.cli.pool import render_pool

        out.text(f"\nPool of the server at {report.server}")
        render_pool(report.pool, f"server {report.server}")


def status(json_output: JsonOption = False, memory_limit: MemoryLimitOption = None) -> None:
    """Show the machine, MLX's memory counters and the pool budget."""
    report = collect(memory_limit)
    if json_output:
        out.json(report)
    else:
        render(report)
