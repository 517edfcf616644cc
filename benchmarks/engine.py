"""The serving engine in process: aggregate tokens/s of 1 vs 8 requests, one adapter vs 4 mixed, side by side.

``python -m benchmarks.engine [--hidden 512 --layers 8 --dtype float32 --tokens 32 --rounds 3]``

Every case runs on one engine over one random-weight llama, greedy, each round interleaving the cases so
machine noise hits them alike; the medians and their ratios are printed. mlx-lm's own ``stream_generate``
(one request) and ``batch_generate`` (8 requests, no adapter) run beside them as the reference.
Then the per-row LoRA kernels (``gather_mm`` vs ``x @ A[ids]``, native dtype vs float32) are timed per dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.models import ModelSpec, build_model, synthesize_adapter
from benchmarks.server import PROMPTS


def _engine(model_dir: Path, rows: int) -> Any:
    from mlx_lm import load

    from mlxman.engine.scheduler import Engine, EngineConfig
    from mlxman.engine.slots import SlotBank

    model, tokenizer = load(str(model_dir))[:2]
    bank = SlotBank(model, slots=4, max_rank=8)
    return Engine(model, tokenizer, bank=bank, config=EngineConfig(max_rows=rows))


def _run_engine(engine: Any, adapters: list[Any], tokens: int) -> tuple[int, float]:
    """All requests submitted at once; aggregate = generated tokens / wall time to the last one's end."""
    from mlxman.engine.rows import Submission
    from mlxman.generate import GenerationRequest, prompt_tokens

    started = time.perf_counter()
    tickets = []
    for i, adapter in enumerate(adapters):
        request = GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens)
        tickets.append(engine.submit(Submission(prompt_tokens(engine.tokenizer, request), request, adapter)))
    generated = sum(t.result(timeout=600)[1].stats.generation_tokens for t in tickets)
    return generated, time.perf_counter() - started


def _mlx_lm_runners(
    model_dir: Path, adapter: Path, tokens: int
) -> dict[str, Callable[[], tuple[int, float]]]:
    from mlx_lm import batch_generate, load, stream_generate

    from mlxman.generate import GenerationRequest, prompt_tokens

    model, tokenizer = load(str(model_dir))[:2]
    with_adapter = load(str(model_dir), adapter_path=str(adapter))[0]
    prompts = [prompt_tokens(tokenizer, GenerationRequest(prompt=p)) for p in PROMPTS]

    def stream(m: Any) -> tuple[int, float]:
        started, count = time.perf_counter(), 0
        for response in stream_generate(m, tokenizer, prompts[0], max_tokens=tokens):
            count = response.generation_tokens
        return count, time.perf_counter() - started

    def eight() -> tuple[int, float]:
        started = time.perf_counter()
        result = batch_generate(model, tokenizer, prompts, max_tokens=tokens, return_token_ids=True)
        return sum(len(ids) for ids in result.token_ids or []), time.perf_counter() - started

    return {
        "mlx-lm stream_generate, 1 base": lambda: stream(model),
        "mlx-lm stream_generate, 1 adapter": lambda: stream(with_adapter),
        "mlx-lm batch_generate, 8 base": eight,
    }


def measure(model_dir: Path, adapter_dirs: list[Path], tokens: int, rounds: int) -> dict[str, float]:
    from mlxman.pool.swap import read_adapter

    adapters = [read_adapter(p) for p in adapter_dirs]
    engine = _engine(model_dir, rows=8)
    cases: dict[str, Callable[[], tuple[int, float]]] = {
        "engine 1 base": lambda: _run_engine(engine, [None], tokens),
        "engine 1 adapter": lambda: _run_engine(engine, [adapters[0]], tokens),
        "engine 8 base": lambda: _run_engine(engine, [None] * 8, tokens),
        "engine 8 one adapter": lambda: _run_engine(engine, [adapters[0]] * 8, tokens),
        "engine 8 over 4 adapters": lambda: _run_engine(engine, adapters * 2, tokens),
        **_mlx_lm_runners(model_dir, adapter_dirs[0], tokens),
    }
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for case in cases.values():  # warm-up: compile, allocate, write the slots
            case()
        for r in range(rounds):
            for name, case in cases.items():
                count, seconds = case()
                samples[name].append(count / seconds)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    finally:
        engine.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def lora_kernels(hidden: int, rank: int = 8, slots: int = 5, repeats: int = 100) -> list[dict[str, Any]]:
    """Per-row LoRA term ``(x @ A[row]) @ B[row]`` at decode (batch 8, one token) per dtype and method."""
    import mlx.core as mx

    def timed(fn: Callable[[], mx.array]) -> float:
        for _ in range(5):
            mx.eval(fn())
        started = time.perf_counter()
        for _ in range(repeats):
            mx.eval(fn())
        return (time.perf_counter() - started) / repeats * 1e6

    rows = []
    ids = mx.array([i % 4 + 1 for i in range(8)], dtype=mx.uint32)
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        for method, fn in _kernel_methods(dtype, hidden, rank, slots, ids).items():
            try:
                us: float | None = timed(fn)
            except (RuntimeError, ValueError):
                us = None  # e.g. gather_mm in half precision on CPU
            rows.append({"dtype": str(dtype).split(".")[-1], "method": method, "us": us})
    return rows


def _kernel_methods(dtype: Any, hidden: int, rank: int, slots: int, ids: Any) -> dict[str, Callable[[], Any]]:
    import mlx.core as mx

    x = mx.random.normal((8, 1, hidden)).astype(dtype)
    a32, b32 = mx.random.normal((slots, hidden, rank)) * 0.01, mx.random.normal((slots, rank, hidden)) * 0.01
    a, b, w = a32.astype(dtype), b32.astype(dtype), mx.random.normal((hidden, hidden)).astype(dtype)
    mx.eval(x, a, b, a32, b32, w, ids)
    return {
        "base matmul x @ W.T": lambda: x @ w.T,
        "take x @ A[ids] (native)": lambda: (x @ a[ids]) @ b[ids],
        "take, float32": lambda: ((x.astype(mx.float32) @ a32[ids]) @ b32[ids]).astype(dtype),
        "gather_mm, float32": lambda: mx.gather_mm(
            mx.gather_mm(x.astype(mx.float32), a32, rhs_indices=ids), b32, rhs_indices=ids
        ).astype(dtype),
        "gather_mm (native)": lambda: mx.gather_mm(mx.gather_mm(x, a, rhs_indices=ids), b, rhs_indices=ids),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/engine"))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)

    import mlx.core as mx

    spec = ModelSpec(
        f"h{args.hidden}x{args.layers}",
        hidden=args.hidden,
        heads=8,
        kv_heads=2,
        intermediate=args.hidden * 11 // 4,
        layers=args.layers,
    )
    model_dir = build_model(args.work, spec, args.dtype)
    adapters = [
        synthesize_adapter(model_dir, args.work / f"{model_dir.name}-lora{i}", seed=100 + i) for i in range(4)
    ]
    print(
        f"{model_dir.name} on {mx.default_device()}: {args.tokens} tokens per request, {args.rounds} rounds"
    )
    tps = measure(model_dir, adapters, args.tokens, args.rounds)
    width = max(len(n) for n in tps)
    for name, value in tps.items():
        print(f"  {name:<{width}}  {value:8.1f} tok/s")
    ratios = {
        "batch 8 / batch 1 (base)": tps["engine 8 base"] / tps["engine 1 base"],
        "8 over 4 adapters / 8 base": tps["engine 8 over 4 adapters"] / tps["engine 8 base"],
        "8 over 4 adapters / 8 one adapter": tps["engine 8 over 4 adapters"] / tps["engine 8 one adapter"],
        "1 adapter / 1 base": tps["engine 1 adapter"] / tps["engine 1 base"],
        "engine 1 base / mlx-lm stream_generate": tps["engine 1 base"]
        / tps["mlx-lm stream_generate, 1 base"],
        "engine 1 adapter / mlx-lm stream_generate": tps["engine 1 adapter"]
        / tps["mlx-lm stream_generate, 1 adapter"],
        "engine 8 base / mlx-lm batch_generate 8": tps["engine 8 base"]
        / tps["mlx-lm batch_generate, 8 base"],
    }
    print("ratios:")
    for name, value in ratios.items():
        print(f"  {name:<{max(len(n) for n in ratios)}}  {value:6.2f}x")
    kernels = lora_kernels(args.hidden)
    print(f"per-row LoRA term at decode, batch 8, hidden {args.hidden}, rank 8 (microseconds):")
    for row in kernels:
        us = "unsupported" if row["us"] is None else f"{row['us']:.1f}"
        print(f"  {row['dtype']:<9} {row['method']:<26} {us}")
    if args.json:
        args.json.write_text(json.dumps({"tok_s": tps, "ratios": ratios, "lora_kernels": kernels}, indent=2))


if __name__ == "__main__":
    main()
