"""The one output module: data (text, tables, JSON) on stdout, narration (stats, errors) on stderr."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.theme import Theme

# Colours by meaning, not by place.
THEME = Theme(
    {
        "error": "bold red",
        "warning": "yellow",
        "ok": "green",
        "hint": "dim",
        "key": "bold cyan",
        "muted": "dim",
        "title": "bold",
    }
)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths and tuples to plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Output:
    """Where everything a command shows goes."""

    def __init__(self) -> None:
        self.stdout = Console(theme=THEME, highlight=False, soft_wrap=True)
        self.stderr = Console(theme=THEME, highlight=False, stderr=True, soft_wrap=True)

    def json(self, data: Any) -> None:
        """Machine-readable data: plain JSON, no markup, one document."""
        sys.stdout.write(json.dumps(to_jsonable(data), indent=2) + "\n")
        sys.stdout.flush()

    def text(self, text: str, *, end: str = "\n") -> None:
        """Raw data text (generated tokens), written as it comes."""
        sys.stdout.write(text + end)
        sys.stdout.flush()

    def show(self, renderable: Any) -> None:
        """A rich renderable (table, panel) as data on stdout."""
        self.stdout.print(renderable)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
        """A plain table in the style of ``ollama ps``: upper-case headers, no borders."""
        table = Table(title=title, box=None, header_style="title", pad_edge=False, title_justify="left")
        for column in columns:
            table.add_column(column.upper())
        for row in rows:
            table.add_row(*("-" if v is None else str(v) for v in row))
        self.stdout.print(table)

    def info(self, message: str) -> None:
        self.stderr.print(message)

    def success(self, message: str) -> None:
        self.stderr.print(f"[ok]{message}[/ok]")

    def warn(self, message: str) -> None:
        self.stderr.print(f"[warning]Warning:[/warning] {escape(message)}")

    def hint(self, message: str) -> None:
        self.stderr.print(f"[hint]{escape(message)}[/hint]")

    def error(self, message: str, hint: str | None = None) -> None:
        """One line: what went wrong, then the next step (on its own line after a list of findings)."""
        text = f"[error]Error:[/error] {escape(message)}"
        if hint:
            text += "\nNext: " if "\n" in message else "; "
            text += f"[hint]{escape(hint)}[/hint]"
        self.stderr.print(text)


out = Output()
