"""``mlxman generate``: stream text from a model, with one or several adapters over one resident base."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.columns import Columns
from rich.panel import Panel

from mlxman.answers import Answer, open_pool, run_answer, run_batch
from mlxman.cli.options import (
    BackendOption,
    ContextOption,
    JsonOption,
    MaxModelsOption,
    MemoryLimitOption,
    RankTimeoutOption,
    ShardOption,
)
from mlxman.errors import Interrupted, UsageError
from mlxman.generate import GenerationRequest, GenerationStats
from mlxman.memory import format_bytes
from mlxman.output import out
from mlxman.settings import DEFAULT_MAX_TOKENS

# Below this many columns per answer, several answers are shown one after another instead of side by side.
SIDE_BY_SIDE_MIN_COLUMNS = 40
NO_ADAPTER = "none"


def read_prompt(prompt: str | None) -> str:
    """The --prompt text, else stdin when it is piped."""
    if prompt is not None:
        return prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("No prompt given", "pass --prompt TEXT or pipe the prompt on stdin")
    return sys.stdin.read().strip()


def stats_line(answer: Answer) -> str:
    s: GenerationStats = answer.stats
    load = "base resident" if answer.base_was_resident else f"base loaded in {answer.load_seconds:.2f}s"
    return (
        f"{answer.label}: {load}, adapter swap {answer.swap_seconds * 1000:.1f} ms, "
        f"first token {s.time_to_first_token:.2f}s, "
        f"prompt {s.prompt_tokens} tok at {s.prompt_tps:.1f} tok/s, "
        f"generated {s.generation_tokens} tok at {s.generation_tps:.1f} tok/s, "
        f"peak memory {format_bytes(s.peak_memory_bytes)}, stop: {s.finish_reason}"
    )


def generate(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Model directory, cached Hugging Face id, or name (`mlxman alias`)."
        ),
    ],
    adapter: Annotated[
        Optional[list[str]],
        typer.Option(
            "--adapter", "-a", help="Adapter directory; repeat to compare; 'none' is the bare base."
        ),
    ] = None,
    prompt: Annotated[
        Optional[str], typer.Option("--prompt", "-p", help="Prompt text (default: stdin).")
    ] = None,
    system: Annotated[
        Optional[str], typer.Option("--system", help="System message for the chat template.")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Most tokens to generate.")
    ] = DEFAULT_MAX_TOKENS,
    temp: Annotated[float, typer.Option("--temp", help="Sampling temperature; 0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[
        Optional[int], typer.Option("--seed", help="Random seed for reproducible sampling.")
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")
    ] = False,
    image: Annotated[
        Optional[list[str]], typer.Option("--image", help="Image file for a vision model (repeatable).")
    ] = None,
    json_output: JsonOption = False,
    memory_limit: MemoryLimitOption = None,
    context_length: ContextOption = None,
    max_models: MaxModelsOption = None,
    hosts: Annotated[
        Optional[Path],
        typer.Option(
            "--hosts", help="Shard the model over the machines of this hostfile (mlx.distributed_config's)."
        ),
    ] = None,
    backend: BackendOption = None,
    shard: ShardOption = "pipeline",
    rank_timeout: RankTimeoutOption = 60.0,
) -> None:
    """Generate text, streaming tokens to stdout and stats to stderr."""
    request = GenerationRequest(
        prompt=read_prompt(prompt),
        system=system,
        raw=raw,
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        seed=seed,
        images=tuple(image or ()),
    )
    request.check()
    adapters = [None if a.lower() == NO_ADAPTER else a for a in (adapter or [NO_ADAPTER])]
    # `-a none` asks for the bare base, also of a name for a model with its adapter; no -a keeps the name's.
    base = _base_of(model) if adapter is not None else model
    if hosts is not None:
        from mlxman.cli.sharded import generate_sharded

        generate_sharded(
            hosts=hosts,
            backend=backend,
            shard=shard,
            rank_timeout=rank_timeout,
            model=base if all(a is None for a in adapters) else model,
            adapters=adapters,
            request=request,
            json_output=json_output,
            memory_limit=memory_limit,
            context_length=context_length,
        )
        return
    several = len(adapters) > 1
    side_by_side = several and not json_output and _wide_enough(len(adapters))
    stream = not json_output and not side_by_side
    answers: list[Answer] = []
    with open_pool(memory_limit, context_length, max_models) as pool:
        if several and not request.images:
            batch = [Answer(model if a is not None else base, a) for a in adapters]
            try:
                batched = run_batch(pool, batch, request)
            except KeyboardInterrupt:
                raise Interrupted("Interrupted; generation stopped") from None
            if batched:
                out.info(f"Ran the {len(batch)} answers as one batch on one resident base")
                for answer in batch:
                    if stream:
                        out.stdout.print(f"[title]── {answer.label} ──[/title]")
                        out.text(answer.text)
                    out.info(f"[muted]{stats_line(answer)}[/muted]")
                adapters = []
                answers = batch
        for adapter_path in adapters:
            answer = Answer(model if adapter_path is not None else base, adapter_path)
            if stream and several:
                out.stdout.print(f"[title]── {answer.label} ──[/title]")
            try:
                run_answer(pool, answer, request, on_text=(lambda t: out.text(t, end="")) if stream else None)
            except KeyboardInterrupt:
                if stream:
                    out.text("")
                out.info(stats_line(answer))
                raise Interrupted("Interrupted; generation stopped") from None
            if stream:
                out.text("")
            out.info(f"[muted]{stats_line(answer)}[/muted]")
            answers.append(answer)
    if json_output:
        out.json([a.as_dict() for a in answers])
    elif side_by_side:
        _show_side_by_side(answers)


def _base_of(model: str) -> str:
    """The model a name for a model+adapter pair stands on; anything else as it is."""
    from mlxman.library.aliases import lookup

    alias = lookup(model)
    return alias.model if alias is not None and alias.adapter is not None else model


def _wide_enough(count: int) -> bool:
    return bool(out.stdout.is_terminal) and out.stdout.width >= SIDE_BY_SIDE_MIN_COLUMNS * count


def _show_side_by_side(answers: list[Answer]) -> None:
    width = out.stdout.width // len(answers) - 2
    panels: list[Any] = [Panel(a.text or "(empty)", title=a.label, width=width) for a in answers]
    out.show(Columns(panels))
