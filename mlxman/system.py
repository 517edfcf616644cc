"""What the machine, MLX and a process report about themselves, for ``mlxman status`` and the server."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from mlxman.memory import SystemMemory, system_memory


@dataclass(frozen=True)
class MachineInfo:
    os: str
    os_release: str
    arch: str
    cpu_count: int
    python: str
    memory: SystemMemory


@dataclass(frozen=True)
class MlxInfo:
    """MLX's version and default device; ``error`` if MLX is unusable."""

    version: str | None
    device: str | None
    error: str | None = None


@dataclass(frozen=True)
class MlxMemory:
    """MLX's memory counters in bytes. They count this process only: a status command reads a server's."""

    active_memory: int
    peak_memory: int
    cache_memory: int
    memory_limit: int


@dataclass(frozen=True)
class ProcessInfo:
    """One process's resident memory and OS threads (which MLX keeps per thread that ran on a stream)."""

    pid: int
    rss_bytes: int
    threads: int


def machine_info() -> MachineInfo:
    import os

    return MachineInfo(
        os=platform.system(),
        os_release=platform.release(),
        arch=platform.machine(),
        cpu_count=os.cpu_count() or 1,
        python=platform.python_version(),
        memory=system_memory(),
    )


def mlx_info() -> MlxInfo:
    """MLX's version and device; importing mlx.core is cheap (tens of ms) unlike mlx_lm."""
    try:
        import mlx.core as mx

        version = str(getattr(mx, "__version__", "")) or _installed_version("mlx")
        return MlxInfo(version=version, device=device_name(mx.default_device()))
    except Exception as exc:  # a broken MLX install must not break status
        return MlxInfo(_installed_version("mlx"), None, error=f"{type(exc).__name__}: {exc}")


def _installed_version(package: str) -> str | None:
    from importlib import metadata  # tens of ms to import: only when MLX itself cannot say

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def mlx_memory() -> MlxMemory:
    """This process's MLX counters (call it where the models are: in the server)."""
    import mlx.core as mx

    return MlxMemory(
        active_memory=int(mx.get_active_memory()),
        peak_memory=int(mx.get_peak_memory()),
        cache_memory=int(mx.get_cache_memory()),
        memory_limit=int(mx.get_memory_limit()),
    )


def process_info() -> ProcessInfo:
    import os

    import psutil

    process = psutil.Process()
    return ProcessInfo(
        pid=os.getpid(), rss_bytes=int(process.memory_info().rss), threads=process.num_threads()
    )


def device_name(device: object) -> str:
    """``Device(gpu, 0)`` -> ``gpu``."""
    kind = getattr(device, "type", None)
    return str(getattr(kind, "name", kind or device))
