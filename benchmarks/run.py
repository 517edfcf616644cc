"""Run every benchmark in one process, write results JSON and regenerate docs/benchmarks.md with its plots."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Name, what it compares; run in this order (the cheap, decisive ones first).
BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("switch", "adapter switch vs fresh load"),
    ("memory", "memory: adapters on one base vs copies"),
    ("estimate", "estimate before load vs measured"),
    ("generation", "generation tokens/s vs mlx_lm"),
    ("startup", "CLI start-up vs import mlx_lm"),
    ("server", "server latency and concurrency"),
    ("bad_input", "malformed input: clear errors"),
    ("distributed", "2 loopback ranks vs one process"),
)


def machine() -> dict[str, Any]:
    """What the figures were measured on, from platform, psutil and MLX readings."""
    import mlx.core as mx
    import mlx_lm
    import psutil

    from mlxman.system import device_name

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "mlx": getattr(mx, "__version__", "?"),
        "mlx_lm": mlx_lm.__version__,
        "device": device_name(mx.default_device()),
    }


def _runner(name: str) -> Callable[[Any], dict[str, Any]]:
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    return module.run  # type: ignore[no-any-return]


def run_all(quick: bool, only: list[str], work: Path) -> dict[str, Any]:
    from benchmarks.common import Settings, say

    settings = Settings.for_mode(quick, work)
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "command": "python -m benchmarks" + (" --quick" if quick else ""),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "benchmarks": {},
        "seconds": {},
    }
    started = time.perf_counter()
    for name, title in BENCHMARKS:
        if only and name not in only:
            continue
        say(f"\n== {name}: {title}")
        t0 = time.perf_counter()
        try:
            results["benchmarks"][name] = _runner(name)(settings)
        except Exception as exc:  # one broken comparison must not hide the others' figures
            traceback.print_exc()
            results["benchmarks"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        results["seconds"][name] = time.perf_counter() - t0
    results["wall_seconds"] = time.perf_counter() - started
    return results


def _merged(saved: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """A run of ``--only`` some benchmarks replaces their figures in the saved results and keeps the rest."""
    for key in ("benchmarks", "seconds"):
        saved[key] = {**saved.get(key, {}), **fresh[key]}
    saved["started"], saved["machine"] = fresh["started"], fresh["machine"]
    saved["wall_seconds"] = sum(saved["seconds"].values())
    return saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (< 10 min)")
    parser.add_argument(
        "--only", default="", help="comma-separated subset: " + ",".join(n for n, _ in BENCHMARKS)
    )
    parser.add_argument(
        "--report-only", action="store_true", help="regenerate the docs page from saved results"
    )
    parser.add_argument("--no-docs", action="store_true", help="write results JSON only, leave docs/ alone")
    args = parser.parse_args(argv)
    # A model path that does not exist must never turn into a Hub download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{'quick' if args.quick else 'full'}.json"
    if args.report_only:
        results = json.loads(out.read_text())
    else:
        only = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(only) - {n for n, _ in BENCHMARKS}
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        results = run_all(args.quick, only, RESULTS)
        if only and out.exists():
            results = _merged(json.loads(out.read_text()), results)
        out.write_text(json.dumps(results, indent=2))
        print(f"\nResults: {out.relative_to(HERE.parent)}; wall time {results['wall_seconds']:.0f} s")
    if not args.no_docs:
        from benchmarks.report import write_report

        page = write_report(results, HERE.parent / "docs")
        print(f"Docs: {page.relative_to(HERE.parent)}")
    failed = [n for n, r in results["benchmarks"].items() if "error" in r]
    if failed:
        print(f"Failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
