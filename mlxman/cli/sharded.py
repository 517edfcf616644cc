"""``mlxman generate --hosts``: one generation sharded over several machines, shown from rank 0's events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from mlxman.answers import Answer
from mlxman.errors import Interrupted, UsageError
from mlxman.generate import GenerationRequest, GenerationStats
from mlxman.memory import format_bytes
from mlxman.output import out


def _rows(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Per-rank rows as narration on stderr, aligned like ``ollama ps``."""
    table = [[h for h, _ in columns]]
    for row in rows:
        table.append(
            [
                str(row.get(key, "-")) if key in ("rank", "host") else format_bytes(row.get(key))
                for _, key in columns
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    for r in table:
        out.info(
            "[muted]  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "[/muted]"
        )


def generate_sharded(
    *,
    hosts: Path,
    backend: str | None,
    shard: str,
    rank_timeout: float,
    model: str,
    adapters: list[str | None],
    request: GenerationRequest,
    json_output: bool,
    memory_limit: str | None,
    context_length: int | None,
) -> None:
    from mlxman.distributed.hostfile import read_hostfile
    from mlxman.distributed.launch import ShardedJob, run_sharded
    from mlxman.distributed.sharding import SHARD_MODES
    from mlxman.pool.keys import resolve_target
    from mlxman.settings import load_config, resolve_pool_limits

    if shard not in SHARD_MODES:
        raise UsageError(f"Unknown --shard {shard!r}", f"use one of {', '.join(SHARD_MODES)}")
    if request.images:
        raise UsageError("--image cannot be used with --hosts", "sharded runs take text models only")
    if not rank_timeout > 0:
        raise UsageError(
            f"--rank-timeout must be positive, got {rank_timeout}", "pass e.g. --rank-timeout 60"
        )
    hostfile = read_hostfile(hosts, backend)
    # As on one machine: a name may stand for a model with its adapter; every adapter is checked here first.
    targets = [resolve_target(model, a) for a in adapters]
    adapter_dirs = tuple(str(t.adapter) if t.adapter else None for t in targets)
    limits = resolve_pool_limits(context_length, None, load_config())
    fields = ("prompt", "system", "raw", "max_tokens", "temperature", "top_p", "seed")
    job = ShardedJob(
        hostfile=hostfile,
        model_dir=targets[0].model.path.resolve(),
        adapters=adapter_dirs,
        mode=shard,
        context_tokens=limits.context_tokens,
        memory_limit=memory_limit,
        timeout=rank_timeout,
    )
    answers: list[dict[str, Any]] = []
    several = len(adapters) > 1
    state: dict[str, Any] = {"load_seconds": 0.0}

    def on_event(event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "joined":
            out.info(f"[muted]{event['size']} ranks joined over {hostfile.backend}[/muted]")
        elif kind == "loaded":
            state["load_seconds"] = float(event["seconds"])
            state["measured"] = {row["rank"]: row["measured_bytes"] for row in event["rows"]}
            out.info(f"[muted]Loaded the {shard} shards in {event['seconds']:.2f}s; memory per rank:[/muted]")
            _rows(
                event["rows"],
                [
                    ("RANK", "rank"),
                    ("HOST", "host"),
                    ("ESTIMATED", "weights_bytes"),
                    ("MEASURED", "measured_bytes"),
                    ("MLX ACTIVE", "active_bytes"),
                ],
            )
        elif kind == "answer":
            answer = Answer(model, event.get("adapter"))
            answer.swap_seconds = float(event.get("swap_seconds") or 0.0)
            answer.base_was_resident = bool(answers) or bool(state.get("current"))
            answer.load_seconds = 0.0 if answer.base_was_resident else state["load_seconds"]
            state["current"] = answer
            state["swap"] = event.get("swap")
            if several and not json_output:
                out.stdout.print(f"[title]── {answer.label} ──[/title]")
        elif kind == "text":
            state["current"].text += event["text"]
            if not json_output:
                out.text(event["text"], end="")
        elif kind == "answer_end":
            answer = state["current"]
            answer.stats = GenerationStats(**event["stats"])
            if not json_output:
                out.text("")
            from mlxman.cli.generate import stats_line

            out.info(f"[muted]{stats_line(answer)}[/muted]")
            _rows(
                event["rows"],
                [
                    ("RANK", "rank"),
                    ("HOST", "host"),
                    ("WEIGHTS", "weights_bytes"),
                    ("KV", "kv_bytes"),
                    ("ADAPTER", "adapter_bytes"),
                    ("MLX ACTIVE", "active_bytes"),
                ],
            )
            measured = state.get("measured", {})
            ranks = [{**row, "weights_measured_bytes": measured.get(row["rank"])} for row in event["rows"]]
            answers.append({**answer.as_dict(), "shard": shard, "swap": state["swap"], "ranks": ranks})

    asked = {f: getattr(request, f) for f in fields}
    try:
        run_sharded(job, [(a, asked) for a in adapter_dirs], on_event)
    except KeyboardInterrupt:
        if not json_output and "current" in state:
            out.text("")  # the partial answer's line ends before the error
        raise Interrupted("Interrupted; generation stopped on every rank") from None
    if json_output:
        out.json(answers)


def serve_sharded_cli(
    *,
    hosts: Path,
    backend: str | None,
    shard: str,
    rank_timeout: float,
    preload: list[str],
    host: str,
    port: int,
    api_key: str | None,
    memory_limit: str | None,
    context_length: int | None,
) -> None:
    """``serve --hosts``: the model and adapters from ``--preload MODEL`` and ``--preload MODEL::ADAPTER``."""
    from mlxman.distributed.hostfile import read_hostfile
    from mlxman.distributed.launch import ShardedJob
    from mlxman.distributed.server import ShardedService, serve_sharded
    from mlxman.distributed.sharding import SHARD_MODES
    from mlxman.models.resolve import resolve_model
    from mlxman.pool.keys import resolve_adapter_dir
    from mlxman.server.security import is_loopback
    from mlxman.settings import load_config, resolve_pool_limits

    if shard not in SHARD_MODES:
        raise UsageError(f"Unknown --shard {shard!r}", f"use one of {', '.join(SHARD_MODES)}")
    if not rank_timeout > 0:
        raise UsageError(
            f"--rank-timeout must be positive, got {rank_timeout}", "pass e.g. --rank-timeout 60"
        )
    one_model = UsageError(
        "--hosts serves one model: pass --preload MODEL (and MODEL::ADAPTER for each adapter)",
        "e.g. --preload ~/models/big --preload ~/models/big::~/adapters/a",
    )
    if not preload:
        raise one_model
    hostfile = read_hostfile(hosts, backend)
    # Each spelling of the model (a name, ./big, big/) must reach the same folder; adapters are checked here,
    # before any rank starts.
    model = preload[0].partition("::")[0]
    if len({resolve_model(p.partition("::")[0]).path.resolve() for p in preload}) != 1:
        raise one_model
    resolved = resolve_model(model)
    adapters: list[str | None] = [None]
    for p in preload:
        adapter = p.partition("::")[2]
        if adapter and (found := str(resolve_adapter_dir(adapter))) not in adapters:
            adapters.append(found)
    limits = resolve_pool_limits(context_length, None, load_config())
    job = ShardedJob(
        hostfile=hostfile,
        model_dir=resolved.path.resolve(),
        adapters=tuple(adapters),
        mode=shard,
        context_tokens=limits.context_tokens,
        memory_limit=memory_limit,
        timeout=rank_timeout,
    )
    if not is_loopback(host) and not api_key:
        out.warn(f"Serving on {host} without an API key: anyone who can reach this port can use the model")
    narrate = lambda m: out.info(f"[muted]{escape(m)}[/muted]")  # noqa: E731
    serve_sharded(ShardedService(job, model, narrate=narrate), host, port, api_key, narrate)
