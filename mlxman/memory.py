"""Memory sizes, the machine's memory readings and the pool budget that applies."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from mlxman.errors import UsageError
from mlxman.settings import DEFAULT_MEMORY_LIMIT, MEMORY_LIMIT_ENV, Config

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")
SIZE_HINT = "use a number with a unit, such as 8GB, 512MiB, 1.5G or 75% (of RAM)"


def parse_size(text: str | int, total_bytes: int | None = None) -> int:
    """Parse ``8GB`` (decimal), ``512MiB`` / ``512M`` (binary), ``75%`` (of ``total_bytes``) into bytes."""
    if isinstance(text, bool):
        raise UsageError(f"Invalid memory size {text!r}", SIZE_HINT)
    if isinstance(text, int):
        if text <= 0:
            raise UsageError(f"Invalid memory size {text}: it must be positive", SIZE_HINT)
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise UsageError(f"Invalid memory size {text!r}", SIZE_HINT)
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise UsageError(f"Invalid memory size {text!r}: a percentage must be in (0, 100]", SIZE_HINT)
        if total_bytes is None:
            raise UsageError(f"Invalid memory size {text!r}: a percentage needs the total RAM", SIZE_HINT)
        return int(total_bytes * number / 100)
    if unit not in _UNITS:
        raise UsageError(f"Invalid memory size {text!r}: unknown unit {match.group(2)!r}", SIZE_HINT)
    value = number * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"Invalid memory size {text!r}: it must be at least one byte", SIZE_HINT)
    return int(value)


def format_bytes(n: int | float | None) -> str:
    """Human size in binary units, as ``ollama ps`` shows it (``1.5 GiB``)."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SystemMemory:
    """psutil's view of the machine's RAM, in bytes."""

    total: int
    available: int
    used: int


def system_memory() -> SystemMemory:
    import psutil

    vm = psutil.virtual_memory()
    return SystemMemory(total=int(vm.total), available=int(vm.available), used=int(vm.total - vm.available))


def total_memory() -> int:
    """The machine's RAM in bytes, as psutil reports it, from sysconf where there is one: a command that needs
    only the total (``mlxman ls``) skips importing psutil."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return system_memory().total
    return pages * page_size if pages > 0 and page_size > 0 else system_memory().total


@dataclass(frozen=True)
class Budget:
    """The byte limit a pool works under, and where it came from."""

    limit_bytes: int
    spec: str
    source: str


def resolve_budget(
    flag: str | None,
    config: Config,
    total_bytes: int,
    env: Mapping[str, str] | None = None,
) -> Budget:
    """Pick the budget: flag, then ``MLXMAN_MEMORY_LIMIT``, then the config file, then the default."""
    env = os.environ if env is None else env
    candidates = [
        (flag, "--memory-limit"),
        (env.get(MEMORY_LIMIT_ENV) or None, MEMORY_LIMIT_ENV),
        (config.get("memory_limit"), f"config file {config.path}"),
        (DEFAULT_MEMORY_LIMIT, "default"),
    ]
    for spec, source in candidates:
        if spec is None:
            continue
        try:
            limit = parse_size(spec, total_bytes)
        except UsageError as exc:
            raise UsageError(f"{exc.message} (from {source})", exc.hint) from None
        return Budget(limit_bytes=limit, spec=str(spec), source=source)
    raise AssertionError("the default budget always applies")
