"""Sharded runs on 2 loopback ranks against one process: memory per rank, and tokens/s as a ratio.

On one host both ranks share its CPU cores and talk over loopback, so the tokens/s ratio measures the
overhead of sharding (communication and synchronisation per token), not a speed-up. Run:
``python -m benchmarks.distributed [--rounds N] [--tokens N]``; it prints a markdown section.
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

from benchmarks.common import median, ratio, say
from benchmarks.models import QUICK_SIZES, build_model, synthesize_adapter, weights_bytes
from mlxman.memory import format_bytes

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlxman-bench-dist-"))
    spec = QUICK_SIZES[1]
    model = build_model(work / "models", spec, "float16")
    adapter = synthesize_adapter(model, work / "adapter", seed=1)
    hosts = work / "hosts.json"
    hosts.write_text(json.dumps({"backend": "ring", "hosts": [LOOPBACK, LOOPBACK]}))
    tps: dict[str, list[float]] = {"one process": [], "pipeline": [], "tensor": []}
    ranks: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):  # interleaved, so the machine's noise lands on every side alike
        for name in tps:
            sharded = name != "one process"
            answer = _generate(model, adapter, args.tokens, hosts if sharded else None, name)
            tps[name].append(float(answer["generation_tps"]))
            if sharded:
                ranks[name] = answer["ranks"]
            say(f"round {r + 1}: {name} {answer['generation_tps']:.1f} tok/s")
    whole = weights_bytes(model)
    lines = [
        "## Distributed (2 loopback ranks on one host)",
        "",
        f"Model: random-weight llama {spec.name} float16 ({format_bytes(whole)} of weights, "
        f"{spec.layers} blocks), one LoRA adapter; greedy, {args.tokens} tokens, median of {args.rounds} "
        "interleaved rounds. Both ranks share this host's CPU cores and talk over loopback: the tokens/s "
        "ratio is the overhead of sharding, not a speed-up (that needs a second machine).",
        "",
        "| run | rank | weights held | of one process | measured (MLX) | MLX active | tok/s | vs one |",
        "|---|---|---|---|---|---|---|---|",
    ]
    one = median(tps["one process"])
    lines.append(f"| one process | - | {format_bytes(whole)} | 1.00x | - | - | {one:.1f} | 1.00x |")
    for name in ("pipeline", "tensor"):
        t = median(tps[name])
        for row in ranks[name]:
            held, measured = row["weights_bytes"], row["weights_measured_bytes"]
            lines.append(
                f"| {name} | {row['rank']} | {format_bytes(held)} | {ratio(held, whole):.2f}x | "
                f"{format_bytes(measured)} | {format_bytes(row['active_bytes'])} | "
                f"{t:.1f} | {ratio(t, one):.2f}x |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
