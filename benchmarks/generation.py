"""3. Generation tokens/s through mlxman vs ``mlx_lm.stream_generate`` directly, interleaved on one model."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Settings, median, say, settle
from benchmarks.models import BUILT_MARKER, _cached, _finish, build_model, synthesize_adapter

PROMPT = "Tell me something about the weather and the sea."


def _request(max_tokens: int) -> Any:
    from mlxman.generate import GenerationRequest

    return GenerationRequest(prompt=PROMPT, max_tokens=max_tokens)


def direct_runner(model: Path, adapter: Path | None, max_tokens: int) -> Callable[[], tuple[int, float]]:
    """What a user of mlx-lm writes: load once, then stream_generate with a greedy sampler."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlxman.generate import prompt_tokens

    loaded: Any = load(str(model), adapter_path=str(adapter) if adapter else None)
    m, tokenizer = loaded[0], loaded[1]
    tokens = prompt_tokens(tokenizer, _request(max_tokens))

    def once() -> tuple[int, float]:
        sampler = make_sampler(temp=0.0)
        start = time.perf_counter()
        count = 0
        for response in stream_generate(m, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler):
            count = response.generation_tokens
        return count, time.perf_counter() - start

    return once


def mlxman_runner(
    pool: Any, model: Path, adapter: Path | None, max_tokens: int
) -> Callable[[], tuple[int, float]]:
    """What ``mlxman generate`` runs for each answer: acquire from the pool, then TextGeneration."""
    from mlxman.answers import Answer, run_answer

    request = _request(max_tokens)

    def once() -> tuple[int, float]:
        answer = Answer(str(model), str(adapter) if adapter else None)
        start = time.perf_counter()
        run_answer(pool, answer, request)
        return answer.stats.generation_tokens, time.perf_counter() - start

    return once


def cli_runner(model: Path, adapter: Path | None, max_tokens: int) -> Callable[[], tuple[int, float]]:
    """The whole ``mlxman generate --json`` command, in-process; its own generation time, without the load."""
    from typer.testing import CliRunner

    from mlxman.cli.app import app

    args = ["generate", "--model", str(model), "--prompt", PROMPT, "--max-tokens", str(max_tokens), "--json"]
    if adapter:
        args += ["--adapter", str(adapter)]
    runner = CliRunner()

    def once() -> tuple[int, float]:
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            raise RuntimeError(f"mlxman generate failed: {result.output[-2000:]}")
        answer = json.loads(result.stdout)[0]
        return int(answer["generation_tokens"]), float(answer["generation_seconds"])

    return once


def _variant(settings: Settings, label: str, model: Path, adapter: Path | None) -> dict[str, Any]:
    from mlxman.pool import ModelPool

    n = settings.gen_tokens
    with ModelPool(64 * GIB, keep_alive=-1) as pool:
        sides = {
            "mlx_lm": direct_runner(model, adapter, n),
            "mlxman": mlxman_runner(pool, model, adapter, n),
            "mlxman_cli": cli_runner(model, adapter, n),
        }
        for once in sides.values():
            once()  # warm-up: first-call compilation and page cache
        samples: dict[str, list[float]] = {k: [] for k in sides}
        tokens: dict[str, int] = {}
        order = list(sides)
        for r in range(settings.gen_repeats):
            # Interleaved, order rotated each round, so drift on a shared machine hits every side alike.
            for name in order[r % len(order) :] + order[: r % len(order)]:
                count, seconds = sides[name]()
                tokens[name] = count
                samples[name].append(count / seconds)
        del sides
    settle()
    tps = {k: median(v) for k, v in samples.items()}
    # Ratios of the runs of one round, then their median: load from other processes comes and goes in
    # seconds, and a round's runs share it, so paired ratios are steadier than a ratio of medians.
    paired = {
        k: median([a / b for a, b in zip(samples[k], samples["mlx_lm"], strict=True)])
        for k in ("mlxman", "mlxman_cli")
    }
    row = {
        "variant": label,
        "model": model.name,
        "tokens": tokens,
        "tps": tps,
        "samples": samples,
        "ratio": paired["mlxman"],
        "cli_ratio": paired["mlxman_cli"],
    }
    say(
        f"  generate {label:18s}: mlx_lm {tps['mlx_lm']:7.1f} tok/s, mlxman {tps['mlxman']:7.1f} "
        f"({row['ratio']:.3f}x), mlxman generate CLI {tps['mlxman_cli']:7.1f} ({row['cli_ratio']:.3f}x)"
    )
    return row


def run(settings: Settings) -> dict[str, Any]:
    from mlxman.adapters.fuse import fuse_adapter

    root = settings.work / "models"
    # The smallest model: decoding bigger ones on this CPU takes seconds per token.
    model = build_model(root, settings.sizes[0], "float16")
    adapter = synthesize_adapter(model, root / f"{model.name}-lora0", seed=100)
    fused = root / f"{model.name}-fused-lora0"
    recipe = {"adapter": json.loads((adapter / BUILT_MARKER).read_text())}
    if not _cached(fused, recipe):
        shutil.rmtree(fused, ignore_errors=True)
        fuse_adapter(str(model), adapter, fused)
        _finish(fused, recipe)
    rows = [
        _variant(settings, "base", model, None),
        _variant(settings, "unmerged adapter", model, adapter),
        _variant(settings, "fused adapter", fused, None),
    ]
    return {"model": model.name, "max_tokens": settings.gen_tokens, "prompt": PROMPT, "rows": rows}
