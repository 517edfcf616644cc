"""The root command: it only wires the command groups together."""

from __future__ import annotations

from typing import Annotated

import typer

from mlxman import __version__
from mlxman.cli import adapter, alias, demo, embed, generate, pool, serve, status
from mlxman.cli.errors import MlxmanGroup

app = typer.Typer(
    name="mlxman",
    cls=MlxmanGroup,
    help="Run, pool and check MLX models and LoRA adapters on one machine's memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlxman {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Run, pool and check MLX models and LoRA adapters on one machine's memory."""


app.command("generate")(generate.generate)
app.command("embed")(embed.embed)
app.command("demo")(demo.demo)
app.command("status")(status.status)
app.add_typer(adapter.app, name="adapter")
app.add_typer(pool.app, name="pool")
app.add_typer(alias.app, name="alias")
app.command("serve")(serve.serve)


def main() -> None:
    app()
