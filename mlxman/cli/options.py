"""Option aliases shared by several commands, so every command spells them the same way."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
MemoryLimitOption = Annotated[
    Optional[str],
    typer.Option(
        "--memory-limit",
        help="Pool memory budget: 8GB, 512MiB or 75% (of RAM); default $MLXMAN_MEMORY_LIMIT, config, 75%.",
    ),
]
ApiKeyEnvOption = Annotated[
    Optional[str],
    typer.Option(
        "--api-key-env",
        help="Environment variable holding the server's API key (default: MLXMAN_API_KEY when set).",
    ),
]
