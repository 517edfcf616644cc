"""Option aliases shared by several commands, so every command spells them the same way."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlxman.settings import HOST_ENV

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
MemoryLimitOption = Annotated[
    Optional[str],
    typer.Option(
        "--memory-limit",
        help="Pool memory budget: 8GB, 512MiB or 75% (of RAM); default $MLXMAN_MEMORY_LIMIT, config, 75%.",
    ),
]
HostOption = Annotated[
    Optional[str],
    typer.Option("--host", help=f"Server address, host:port (default: ${HOST_ENV}, else 127.0.0.1:11435)."),
]
ApiKeyEnvOption = Annotated[
    Optional[str],
    typer.Option(
        "--api-key-env",
        help="Environment variable holding the server's API key (default: MLXMAN_API_KEY when set).",
    ),
]
# Named like Ollama's context length (OLLAMA_CONTEXT_LENGTH, num_ctx) and LM Studio's --context-length;
# llama.cpp's -c / --ctx-size work too.
ContextOption = Annotated[
    Optional[int],
    typer.Option(
        "--context-length",
        "--ctx-size",
        "-c",
        help="Tokens (prompt plus output) each model gets KV-cache room for, capped at the model's own "
        "context; default $MLXMAN_CONTEXT_LENGTH, config context_length, 4096.",
    ),
]
MaxModelsOption = Annotated[
    Optional[int],
    typer.Option(
        "--max-models",
        help="Most models resident at once (adapters on them do not count); default $MLXMAN_MAX_MODELS, "
        "config max_models, 8.",
    ),
]
# Sharding over several machines (--hosts on generate and serve).
BackendOption = Annotated[
    Optional[str],
    typer.Option("--backend", help="With --hosts: ring or jaccl (default: the hostfile's, else ring)."),
]
ShardOption = Annotated[
    str, typer.Option("--shard", help="With --hosts: pipeline (whole blocks per machine) or tensor.")
]
RankTimeoutOption = Annotated[
    float,
    typer.Option(
        "--rank-timeout", help="With --hosts: seconds to wait for the ranks to join, and for each token."
    ),
]
