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
