"""``mlxman embed``: embeddings from an mlx-embeddings model."""

from __future__ import annotations

import math
import sys
from typing import Annotated, Optional

import typer

from mlxman.answers import open_pool
from mlxman.cli.options import JsonOption, MemoryLimitOption
from mlxman.embed import embed_texts
from mlxman.errors import UsageError
from mlxman.output import out


def read_texts(texts: list[str] | None) -> list[str]:
    if texts:
        return texts
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("No text to embed", "pass texts as arguments or pipe lines on stdin")
    return [line for line in (raw.strip() for raw in sys.stdin) if line]


def embed(
    texts: Annotated[
        Optional[list[str]], typer.Argument(help="Texts to embed (default: lines of stdin).")
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="An mlx-embeddings model directory, cached id or name.")
    ] = "",
    json_output: JsonOption = False,
    memory_limit: MemoryLimitOption = None,
) -> None:
    """Embed texts: dimensions and norms, or the vectors with --json."""
    if not model:
        raise UsageError("No model given", "pass --model with an embeddings model directory")
    items = read_texts(texts)
    with open_pool(memory_limit) as pool:
        # The kind comes from the model's files: refuse a text or vision model before loading it.
        kind = pool.estimate(model).kind
        if kind != "embeddings":
            raise UsageError(
                f"{model} is a {kind} model, not an embeddings model",
                "use `mlxman generate` for it, or pass an embeddings model",
            )
        with pool.acquire(model) as lease:
            result = embed_texts(lease.model, lease.tokenizer, items)
    if json_output:
        out.json(
            {
                "model": lease.key,
                "dimensions": result.dimensions,
                "prompt_tokens": result.prompt_tokens,
                "data": [
                    {"index": i, "text": t, "embedding": v}
                    for i, (t, v) in enumerate(zip(items, result.vectors, strict=False))
                ],
            }
        )
        return
    rows = [
        (i, _preview(t), result.dimensions, f"{math.sqrt(sum(x * x for x in v)):.4f}")
        for i, (t, v) in enumerate(zip(items, result.vectors, strict=False))
    ]
    out.table(["#", "text", "dims", "norm"], rows)


def _preview(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
