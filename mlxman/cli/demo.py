"""``mlxman demo``: build the offline demo kit, then show one base answering with each adapter."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mlxman.answers import Answer, open_pool, run_answer
from mlxman.cli.options import ContextOption, JsonOption, MaxModelsOption, MemoryLimitOption
from mlxman.cli.pool import render_pool
from mlxman.demo.kit import DEMO_PROMPT, ensure_demo_kit
from mlxman.generate import GenerationRequest
from mlxman.output import out

DEMO_MAX_TOKENS = 24


def demo(
    prompt: Annotated[
        str, typer.Option("--prompt", "-p", help="The prompt every adapter answers.")
    ] = DEMO_PROMPT,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build the demo kit again from scratch.")
    ] = False,
    json_output: JsonOption = False,
    memory_limit: MemoryLimitOption = None,
    context_length: ContextOption = None,
    max_models: MaxModelsOption = None,
) -> None:
    """Build (once) a small local model and adapters, then compare their answers over one resident base."""
    with out.stderr.status("Preparing the demo kit…") as spinner:
        kit = ensure_demo_kit(progress=lambda msg: spinner.update(msg + "…"), force=rebuild)
    out.info(f"Demo kit: {kit.root}")
    request = GenerationRequest(prompt=prompt, max_tokens=DEMO_MAX_TOKENS)
    answers: list[Answer] = []
    with open_pool(memory_limit, context_length, max_models) as pool:
        for adapter in [None, *kit.adapters.values()]:
            answers.append(
                run_answer(pool, Answer(str(kit.model), str(adapter) if adapter else None), request)
            )
        status = pool.status()
    if json_output:
        out.json({"prompt": prompt, "answers": [a.as_dict() for a in answers], "pool": status.as_dict()})
        return
    table = Table(title=f"Prompt: {prompt}", title_justify="left", header_style="title")
    for column in ("ADAPTER", "ANSWER", "BASE", "SWAP", "TOK/S"):
        table.add_column(column)
    for a in answers:
        base = "resident" if a.base_was_resident else f"loaded {a.load_seconds:.2f}s"
        table.add_row(
            a.label,
            a.text or "(empty)",
            base,
            f"{a.swap_seconds * 1000:.1f} ms",
            f"{a.stats.generation_tps:.0f}",
        )
    out.show(table)
    render_pool(status.as_dict(), "pool of this command (freed on exit)")
