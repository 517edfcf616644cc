"""Checks every rank agrees on, from numbers the ranks exchanged: versions and each machine's memory share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlxman.memory import format_bytes


@dataclass(frozen=True)
class RankShare:
    """One rank's share of a sharded model, measured against its own machine, in bytes."""

    rank: int
    host: str
    weights_bytes: int
    kv_bytes: int
    adapter_bytes: int
    budget_bytes: int
    available_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.adapter_bytes


def version_problem(versions: Sequence[str], hosts: Sequence[str]) -> str | None:
    """A sentence naming the ranks whose mlxman/MLX versions differ from rank 0's, or None when all agree."""
    odd = [r for r, v in enumerate(versions) if v != versions[0]]
    if not odd:
        return None
    others = "; ".join(f"rank {r} ({hosts[r]}) has {versions[r]}" for r in odd)
    return f"The ranks run different versions: rank 0 ({hosts[0]}) has {versions[0]}; {others}"


def share_problems(shares: Sequence[RankShare]) -> list[str]:
    """One sentence per rank whose share does not fit its machine's budget or available memory."""
    problems = []
    for s in shares:
        what = (
            f"rank {s.rank} ({s.host}) needs {format_bytes(s.need_bytes)} "
            f"(weights {format_bytes(s.weights_bytes)}, KV {format_bytes(s.kv_bytes)}"
            + (f", adapters {format_bytes(s.adapter_bytes)}" if s.adapter_bytes else "")
            + ")"
        )
        if s.need_bytes > s.budget_bytes:
            problems.append(f"{what} but its budget is {format_bytes(s.budget_bytes)}")
        elif s.need_bytes > s.available_bytes:
            problems.append(f"{what} but only {format_bytes(s.available_bytes)} is available there")
    return problems
