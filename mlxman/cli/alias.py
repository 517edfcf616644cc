"""``mlxman alias``: short names for a model or a model+adapter pair, usable wherever a model id is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from mlxman.cli.options import JsonOption
from mlxman.errors import MlxmanError
from mlxman.files import exists
from mlxman.library.aliases import Alias, load_aliases, remove_aliases, set_alias
from mlxman.output import out

SET_COMMAND = "set"


class AliasGroup(TyperGroup):
    """``mlxman alias NAME MODEL`` runs ``alias set NAME MODEL``: a first word that is no command names."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [SET_COMMAND, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=AliasGroup,
    help="Short names for models and model+adapter pairs: `mlxman alias NAME MODEL[::ADAPTER]`, then "
    "`generate -m NAME`, a request's `model`, `pool load NAME`.",
    no_args_is_help=True,
)


@app.command(SET_COMMAND)
def set_(
    name: Annotated[str, typer.Argument(help="The name: letters, digits, '.', '_', '-', and one ':tag'.")],
    target: Annotated[
        str, typer.Argument(help="MODEL or MODEL::ADAPTER: folders or a cached Hugging Face id; must exist.")
    ],
    json_output: JsonOption = False,
) -> None:
    """Name a model, or a model with an adapter (`mlxman alias NAME MODEL` does the same)."""
    alias, previous = set_alias(name, target)
    if json_output:
        out.json({**alias.as_dict(), "replaced": previous.as_dict() if previous else None})
        return
    if previous is not None and previous.target != alias.target:
        out.success(f"{escape(name)} now stands for {escape(alias.target)} (was {escape(previous.target)})")
    else:
        out.success(f"{escape(name)} stands for {escape(alias.target)}")
    if exists(Path(name)):
        # Names win over folders in the current directory, so say which one `-m NAME` now means.
        out.hint(f"A file or folder ./{name} is here too: `{name}` means the name; write ./{name} for it.")


@app.command("ls")
def ls(json_output: JsonOption = False) -> None:
    """List the names and what each stands for; a name whose model or adapter is gone says so."""
    aliases = sorted(load_aliases().values(), key=lambda a: a.name)
    rows = [(alias, _problem(alias)) for alias in aliases]
    if json_output:
        out.json([{**alias.as_dict(), "ok": problem is None, "problem": problem} for alias, problem in rows])
        return
    if not rows:
        out.info("No names yet.")
        out.hint("Name a model with `mlxman alias NAME MODEL[::ADAPTER]`.")
        return
    # Paths fold rather than being cut: their ends tell models apart.
    table = Table(box=None, header_style="title", pad_edge=False)
    table.add_column("NAME", no_wrap=True)
    for column in ("MODEL", "ADAPTER", "STATUS"):
        table.add_column(column, overflow="fold")
    for alias, problem in rows:
        table.add_row(
            escape(alias.name), escape(alias.model), escape(alias.adapter or "-"), escape(problem or "ok")
        )
    out.show(table)


def _problem(alias: Alias) -> str | None:
    """Why the name cannot be used now (its model or adapter is gone), or None."""
    from mlxman.models.resolve import resolve_model
    from mlxman.pool.keys import resolve_adapter_dir

    try:
        resolve_model(alias.model)
        if alias.adapter is not None:
            resolve_adapter_dir(alias.adapter)
    except MlxmanError as exc:
        return exc.message
    return None


@app.command("rm")
def rm(
    names: Annotated[list[str], typer.Argument(help="Names to forget (the models stay).")],
    json_output: JsonOption = False,
) -> None:
    """Forget names; the models and adapters they stood for are left as they are."""
    removed = remove_aliases(names)  # all or none: a typo in the list forgets nothing
    if json_output:
        out.json([alias.as_dict() for alias in removed])
        return
    for alias in removed:
        out.success(f"Removed {escape(alias.name)} ({escape(alias.target)})")
