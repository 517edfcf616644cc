"""Sharded runs on 2 loopback ranks against one process: memory per rank, and tokens/s as a ratio.

On one host both ranks share its CPU cores and talk over loopback, so the tokens/s ratio measures the
overhead of sharding (communication and synchronisation per token), not a speed-up. Run:
``python -m benchmarks --only distributed`` (part of the whole run), or
``python -m benchmarks.distributed [--rounds N] [--tokens N]``, which prints the markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import Settings, median, say
from benchmarks.models import QUICK_SIZES, build_model, synthesize_adapter, weights_bytes

LOOPBACK = {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}
PROMPT = "hello"


def _generate(model: Path, adapter: Path, tokens: int, hosts: Path | None, shard: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "mlxman", "generate", "-m", str(model), "-a", str(adapter), "-p", PROMPT]
    cmd += ["--max-tokens", str(tokens), "--json"]
    if hosts is not None:
        cmd += ["--hosts", str(hosts), "--shard", shard]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    answer: dict[str, Any] = json.loads(done.stdout)[0]
    return answer


def measure(work: Path, rounds: int, tokens: int) -> dict[str, Any]:
    """One process, then 2 loopback ranks under pipeline and tensor, interleaved ``rounds`` times."""
    spec = QUICK_SIZES[1]
    model = build_model(work / "models", spec, "float16")
    adapter = synthesize_adapter(model, work / "dist-adapter", seed=1)
    hosts = work / "hosts.json"
    hosts.write_text(json.dumps({"backend": "ring", "hosts": [LOOPBACK, LOOPBACK]}))
    tps: dict[str, list[float]] = {"one process": [], "pipeline": [], "tensor": []}
    ranks: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):  # interleaved, so the machine's noise lands on every side alike
        for name in tps:
            sharded = name != "one process"
            answer = _generate(model, adapter, tokens, hosts if sharded else None, name)
            tps[name].append(float(answer["generation_tps"]))
            if sharded:
                ranks[name] = answer["ranks"]
            say(f"round {r + 1}: {name} {answer['generation_tps']:.1f} tok/s")
    return {
        "model": f"random-weight llama {spec.name} float16 ({spec.layers} blocks), one LoRA adapter",
        "weights_bytes": weights_bytes(model),
        "rounds": rounds,
        "tokens": tokens,
        "tps": {name: median(samples) for name, samples in tps.items()},
        "ranks": ranks,
    }


def run(settings: Settings) -> dict[str, Any]:
    return measure(settings.work, rounds=2 if settings.quick else 3, tokens=settings.gen_tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    from benchmarks.report import distributed_section

    result = measure(Path(tempfile.mkdtemp(prefix="mlxman-bench-dist-")), args.rounds, args.tokens)
    print(distributed_section(result, Path("docs"))[0])


if __name__ == "__main__":
    main()
