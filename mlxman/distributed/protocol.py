"""What ranks tell the launching process: one JSON event per line on stdout, behind a marker."""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

# mlx.launch merges every rank's stdout into its own; the marker sets mlxman's events apart.
MARKER = "@mlxman-event "
# Event names, in the order a run sends them.
STARTED = "started"
JOINED = "joined"
SHARES = "shares"
LOADED = "loaded"
ANSWER = "answer"
TEXT = "text"
ANSWER_END = "answer_end"
DONE = "done"
ERROR = "error"


def emit(event: str, **fields: Any) -> None:
    """Write one event line; flushed at once so the launcher sees it while the rank works on."""
    sys.stdout.write(MARKER + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on ``line``, or None for any other output (or a garbled event)."""
    start = line.find(MARKER)
    if start < 0:
        return None
    try:
        doc = json.loads(line[start + len(MARKER) :])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("event"), str) else None


def encode_spec(spec: dict[str, Any]) -> str:
    """A job spec as one shell-safe argument (mlx.launch passes it through SSH to every host)."""
    return base64.urlsafe_b64encode(json.dumps(spec).encode()).decode()


def decode_spec(text: str) -> dict[str, Any]:
    doc = json.loads(base64.urlsafe_b64decode(text.encode()).decode())
    if not isinstance(doc, dict):
        raise ValueError("the job spec is not an object")
    return doc


# Requests reach the ranks on stdin (mlx.launch copies its stdin to every rank; over SSH through a terminal,
# whose lines hold at most 4,095 bytes): base64 in short lines, "+" for more to come, "." for the last.
READY = "ready"
REQUEST_LINE_CHARS = 1000


def request_lines(doc: dict[str, Any]) -> str:
    text = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()
    parts = [text[i : i + REQUEST_LINE_CHARS] for i in range(0, len(text), REQUEST_LINE_CHARS)] or [""]
    return "".join(("+" if i < len(parts) - 1 else ".") + p + "\n" for i, p in enumerate(parts))


class RequestReader:
    """Reassembles requests from the lines a rank reads on stdin; other lines (terminal noise) are ignored."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.strip()
        if not line or line[0] not in "+.":
            return None
        self._parts.append(line[1:])
        if line[0] == "+":
            return None
        text, self._parts = "".join(self._parts), []
        try:
            doc = json.loads(base64.urlsafe_b64decode(text.encode()).decode())
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
