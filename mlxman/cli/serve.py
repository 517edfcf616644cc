"""``mlxman serve``: keep a pool in a long-lived process behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mlxman.cli.options import (
    BackendOption,
    ContextOption,
    MaxModelsOption,
    MemoryLimitOption,
    RankTimeoutOption,
    ShardOption,
)
from mlxman.client import api_key_from_env, server_address
from mlxman.errors import UsageError
from mlxman.memory import resolve_budget, system_memory
from mlxman.output import out
from mlxman.settings import (
    API_KEY_ENV,
    DEFAULT_ADAPTER_SLOTS,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_LORA_RANK,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    HOST_ENV,
    load_config,
    resolve_pool_limits,
)


def serve(
    host: Annotated[
        Optional[str],
        typer.Option("--host", help=f"Address to bind, host or host:port (default: ${HOST_ENV}, 127.0.0.1)."),
    ] = None,
    port: Annotated[
        Optional[int], typer.Option("--port", help="Port to bind (default 11435).", min=1, max=65535)
    ] = None,
    memory_limit: MemoryLimitOption = None,
    context_length: ContextOption = None,
    max_models: MaxModelsOption = None,
    keep_alive: Annotated[
        Optional[str],
        typer.Option(
            "--keep-alive", help="Idle time before an entry is unloaded: 5m, 1h, 0 (at once), -1 (never)."
        ),
    ] = None,
    preload: Annotated[
        Optional[list[str]],
        typer.Option("--preload", help="Load and pin MODEL or MODEL::ADAPTER at start (repeatable)."),
    ] = None,
    adapter_root: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--adapter-root",
            help="Folder whose models and adapters requests may name (repeatable); without one, requests "
            "may name only what the operator loaded.",
        ),
    ] = None,
    api_key_env: Annotated[
        Optional[str],
        typer.Option(
            "--api-key-env",
            help=f"Environment variable holding the API key (default: {API_KEY_ENV} when set). With a key, "
            "every endpoint but /health needs `Authorization: Bearer KEY`.",
        ),
    ] = None,
    admin_key_env: Annotated[
        Optional[str],
        typer.Option(
            "--admin-key-env",
            help="Environment variable holding an admin key: it opens every endpoint, and only it lets the "
            "pool admin endpoints name paths outside the --adapter-root folders.",
        ),
    ] = None,
    adapter_slots: Annotated[
        int,
        typer.Option(
            "--adapter-slots",
            help="LoRA adapters per base that share a batch (requests for different adapters in one forward "
            "pass); 0 runs every adapter swapped in, alone.",
            min=0,
        ),
    ] = DEFAULT_ADAPTER_SLOTS,
    max_lora_rank: Annotated[
        int,
        typer.Option(
            "--max-lora-rank",
            help="Largest LoRA rank a slot holds; an adapter above it (or DoRA) runs swapped in, alone.",
            min=1,
        ),
    ] = DEFAULT_MAX_LORA_RANK,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Most requests decoded together per base.", min=1)
    ] = DEFAULT_MAX_BATCH,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", help="Most requests waiting per base; beyond it a request gets 429.", min=1
        ),
    ] = DEFAULT_MAX_QUEUE,
    hosts: Annotated[
        Optional[Path],
        typer.Option(
            "--hosts",
            help="Serve one model sharded over the machines of this hostfile (mlx.distributed_config's): "
            "--preload MODEL, and MODEL::ADAPTER for each adapter.",
        ),
    ] = None,
    backend: BackendOption = None,
    shard: ShardOption = "pipeline",
    rank_timeout: RankTimeoutOption = 60.0,
) -> None:
    """Serve the pool over HTTP: OpenAI-compatible /v1 endpoints plus pool admin; stop with Ctrl-C."""
    from mlxman.pool import parse_keep_alive
    from mlxman.server.runner import ServeOptions
    from mlxman.server.runner import serve as run_server
    from mlxman.server.security import is_loopback

    config = load_config()
    address = server_address(host, config.get("host"), _config_port(config.get("port")) or DEFAULT_PORT)
    if hosts is not None:
        from mlxman.cli.sharded import serve_sharded_cli

        serve_sharded_cli(
            hosts=hosts,
            backend=backend,
            shard=shard,
            rank_timeout=rank_timeout,
            preload=preload or [],
            host=address.host,
            port=port or address.port,
            api_key=api_key_from_env(api_key_env),
            memory_limit=memory_limit,
            context_length=context_length,
        )
        return
    keep_alive_spec = str(keep_alive or config.get("keep_alive") or DEFAULT_KEEP_ALIVE)
    limits = resolve_pool_limits(context_length, max_models, config)
    options = ServeOptions(
        host=address.host,
        port=port or address.port,
        budget=resolve_budget(memory_limit, config, system_memory().total),
        keep_alive=parse_keep_alive(keep_alive_spec),
        keep_alive_spec=keep_alive_spec,
        preload=preload or [],
        roots=adapter_root or [],
        api_key=api_key_from_env(api_key_env),
        admin_key=api_key_from_env(admin_key_env, None, "--admin-key-env"),
        context_tokens=limits.context_tokens,
        max_models=limits.max_models,
        adapter_slots=adapter_slots,
        max_lora_rank=max_lora_rank,
        max_batch=max_batch,
        max_queue=max_queue,
    )
    if options.admin_key and options.admin_key == options.api_key:
        raise UsageError("The admin key is the same as the API key", f"give {admin_key_env} a key of its own")
    if not is_loopback(options.host) and not options.api_key:
        out.warn(
            f"Serving on {options.host} without an API key: anyone who can reach this port can use and steer "
            f"the pool; set {API_KEY_ENV} (or --api-key-env NAME)"
        )
    run_server(options, out.info)


def _config_port(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise UsageError(f"Invalid port {value!r} in the config file", "use a number from 1 to 65535")
