"""Timing, memory and result helpers shared by every benchmark."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.models import FULL_SIZES, QUICK_SIZES, ModelSpec

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Settings:
    """What one run measures and how hard: the quick mode shrinks models and repeats."""

    quick: bool
    work: Path
    repeats: int
    gen_repeats: int
    gen_tokens: int
    startup_repeats: int
    server_tokens: int
    server_requests_per_client: int
    sizes: tuple[ModelSpec, ...]

    @classmethod
    def for_mode(cls, quick: bool, work: Path) -> Settings:
        if quick:
            return cls(
                quick,
                work,
                repeats=5,
                gen_repeats=7,
                gen_tokens=48,
                startup_repeats=5,
                server_tokens=32,
                server_requests_per_client=2,
                sizes=QUICK_SIZES,
            )
        return cls(
            quick,
            work,
            repeats=9,
            gen_repeats=9,
            gen_tokens=128,
            startup_repeats=10,
            server_tokens=64,
            server_requests_per_client=4,
            sizes=FULL_SIZES,
        )


def median(samples: list[float]) -> float:
    return float(statistics.median(samples))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def settle() -> None:
    """Drop what Python and MLX hold on to, so the next reading starts clean."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


def active_bytes() -> int:
    import mlx.core as mx

    return int(mx.get_active_memory())


@contextmanager
def measured_active() -> Iterator[dict[str, int]]:
    """MLX active memory added inside the block (cache cleared first and last)."""
    settle()
    reading: dict[str, int] = {"before": active_bytes()}
    yield reading
    settle()
    reading["delta"] = active_bytes() - reading["before"]


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def say(message: str) -> None:
    print(message, flush=True)
