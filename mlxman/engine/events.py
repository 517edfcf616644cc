"""What the engine reports for a request (Started, Piece, then Finished or Failed) and the text stop matcher.

These mirror the server's job events one for one, so a job can hand engine events straight to its client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mlxman.generate import GenerationStats


@dataclass(frozen=True)
class Started:
    """The row joined the batch: prefill begins."""

    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    text: str


@dataclass(frozen=True)
class Finished:
    stats: GenerationStats
    finish_reason: str  # "stop", "length" or "cancelled"


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = Started | Piece | Finished | Failed


class StopMatcher:
    """Cut the text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop sequence was hit."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            ready, self.pending = self.pending[: min(hits)], ""
            return ready, True
        keep = max((_overlap(self.pending, s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        return ready, False

    def flush(self) -> str:
        ready, self.pending = self.pending, ""
        return ready


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of ``text`` that begins ``stop``."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0
