"""The root command: it only wires the command groups together, each imported when it runs."""

from __future__ import annotations

from typing import Annotated

import typer

from mlxman import __version__
from mlxman.cli.lazy import Lazy, LazyGroup

# Every command: its name, where it lives ("module:attr", a function or a typer.Typer group) and the line
# `mlxman --help` lists for it (the first line of its own help; tests/test_cli_startup.py checks they agree).
COMMANDS = {
    "generate": Lazy(
        "mlxman.cli.generate:generate", "Generate text, streaming tokens to stdout and stats to stderr."
    ),
    "embed": Lazy("mlxman.cli.embed:embed", "Embed texts: dimensions and norms, or the vectors with --json."),
    "demo": Lazy(
        "mlxman.cli.demo:demo",
        "Build (once) a small local model and adapters, then compare their answers over one resident base.",
    ),
    "status": Lazy(
        "mlxman.cli.status:status",
        "Show the machine, MLX, the pool budget, and a running server's MLX memory, threads and pool.",
    ),
    "ls": Lazy(
        "mlxman.cli.library:ls",
        "List the models and adapters on this machine: kind, size, memory estimate, and whether each fits.",
    ),
    "pull": Lazy(
        "mlxman.cli.pull:pull",
        "Download a model or adapter from the Hugging Face Hub (only the files MLX loads), then check it.",
    ),
    "rm": Lazy(
        "mlxman.cli.pull:rm",
        "Remove a model or adapter from the Hugging Face cache; refused while a running server holds it.",
    ),
    "serve": Lazy(
        "mlxman.cli.serve:serve",
        "Serve the pool over HTTP: OpenAI-compatible /v1 endpoints plus pool admin; stop with Ctrl-C.",
    ),
    "adapter": Lazy("mlxman.cli.adapter:app", "Validate, inspect, convert and fuse LoRA adapters."),
    "pool": Lazy(
        "mlxman.cli.pool:app",
        "Show and steer the pool of a running `mlxman serve` (like `ollama ps` / `lms ps`).",
    ),
    "alias": Lazy(
        "mlxman.cli.alias:app",
        "Short names for models and model+adapter pairs: `mlxman alias NAME MODEL[::ADAPTER]`, then "
        "`generate -m NAME`, a request's `model`, `pool load NAME`.",
    ),
}


class RootGroup(LazyGroup):
    registry = COMMANDS


app = typer.Typer(
    name="mlxman",
    cls=RootGroup,
    help="Run, pool and check MLX models and LoRA adapters on one machine's memory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, as click prints it: typer's rich help imports a Markdown renderer (markdown-it, pygments)
    # that alone takes half of `mlxman --help`'s start-up budget.
    rich_markup_mode=None,
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


def main() -> None:
    app()
