"""What the machine and MLX report about themselves, for ``mlxman status``."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

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
    """MLX's version, default device and memory counters (bytes); ``error`` if MLX is unusable."""

    version: str | None
    device: str | None
    active_memory: int | None
    peak_memory: int | None
    cache_memory: int | None
    memory_limit: int | None
    error: str | None = None


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
    """Read MLX's counters; importing mlx.core is cheap (tens of ms) unlike mlx_lm."""
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:
        version = None
    try:
        import mlx.core as mx

        return MlxInfo(
            version=version,
            device=device_name(mx.default_device()),
            active_memory=int(mx.get_active_memory()),
            peak_memory=int(mx.get_peak_memory()),
            cache_memory=int(mx.get_cache_memory()),
            memory_limit=int(mx.get_memory_limit()),
        )
    except Exception as exc:  # a broken MLX install must not break status
        return MlxInfo(version, None, None, None, None, None, error=f"{type(exc).__name__}: {exc}")


def device_name(device: object) -> str:
    """``Device(gpu, 0)`` -> ``gpu``."""
    kind = getattr(device, "type", None)
    return str(getattr(kind, "name", kind or device))
