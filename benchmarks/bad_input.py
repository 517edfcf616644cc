"""7. Bad input: malformed adapters and models through the real CLI and the pool; clear errors, no traces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import GIB, Settings, measured_active, say
from benchmarks.models import build_model, synthesize_adapter
from benchmarks.startup import mlxman_command

# A command that has not answered by then counts as a hang.
HANG_SECONDS = 60


def _cases(work: Path, model: Path, good: Path, other_model: Path) -> dict[str, Path]:
    """Broken adapters, each a copy of a sound one with one thing wrong."""
    cases: dict[str, Path] = {}

    def variant(name: str) -> Path:
        out = work / name
        shutil.copytree(good, out)
        cases[name] = out
        return out

    (work / "empty").mkdir()
    cases["empty"] = work / "empty"
    (variant("config not JSON") / "adapter_config.json").write_text("{not json")
    (variant("no weights") / "adapters.safetensors").unlink()
    bad_type = variant("unknown fine_tune_type")
    config = json.loads((bad_type / "adapter_config.json").read_text())
    (bad_type / "adapter_config.json").write_text(json.dumps({**config, "fine_tune_type": "qlora++"}))
    (variant("truncated weights") / "adapters.safetensors").write_bytes(b"\x10\x00\x00")
    wrong = synthesize_adapter(other_model, work / "wrong shapes", seed=5)
    cases["wrong shapes for the base"] = wrong
    peft = work / "PEFT .bin"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (peft / "adapter_model.bin").write_bytes(b"\x00" * 16)
    cases["PEFT .bin"] = peft
    return cases


def _headline(err: str, places: dict[str, str]) -> str:
    """The ``Error:`` line (else the last line), with this machine's paths replaced by what they stand for."""
    lines = err.strip().splitlines()
    line = next((x for x in lines if x.startswith("Error:")), lines[-1] if lines else "")
    for path, name in places.items():
        line = line.replace(path, name)
    return line[:200]


def _judge(argv: list[str], env: dict[str, str], places: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=HANG_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        return {"exit": None, "clear": False, "traceback": False, "hang": True, "seconds": HANG_SECONDS}
    err = done.stderr + done.stdout
    return {
        "exit": done.returncode,
        "clear": done.returncode != 0 and ("Error" in err or "error" in err),
        "traceback": "Traceback" in err,
        "hang": False,
        "seconds": time.perf_counter() - start,
        "message": _headline(err, places),
    }


def run(settings: Settings) -> dict[str, Any]:
    root = settings.work / "models"
    model = build_model(root, settings.sizes[0], "float16")
    other = build_model(root, settings.sizes[1], "float16")
    good = synthesize_adapter(model, root / f"{model.name}-lora0", seed=100)
    mlxman = mlxman_command()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlxman-bench-bad-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLXMAN_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}
        env.pop("MLXMAN_DEBUG", None)
        cases = _cases(work, model, good, other)
        places = {str(work): "CASES", str(root): "MODELS"}
        for name, adapter in cases.items():
            for command in ("adapter validate", "generate"):
                if command == "adapter validate":
                    argv = [*mlxman, "adapter", "validate", str(adapter), "--model", str(model)]
                else:
                    argv = [
                        *mlxman,
                        "generate",
                        "--model",
                        str(model),
                        "--adapter",
                        str(adapter),
                        "-p",
                        "hi",
                        "--max-tokens",
                        "4",
                    ]
                rows.append({"case": name, "command": f"mlxman {command}", **_judge(argv, env, places)})
        for name, argv in {
            "model that does not exist": [*mlxman, "generate", "--model", str(work / "nope"), "-p", "hi"],
            "model without weights": [*mlxman, "generate", "--model", str(cases["empty"]), "-p", "hi"],
            "max-tokens out of range": [
                *mlxman,
                "generate",
                "--model",
                str(model),
                "-p",
                "hi",
                "--max-tokens",
                "0",
            ],
        }.items():
            rows.append({"case": name, "command": "mlxman generate", **_judge(argv, env, places)})
        leaked = _pool_leak(model, cases["wrong shapes for the base"])
    ok = [r for r in rows if r["clear"] and not r["traceback"] and not r["hang"]]
    for r in rows:
        mark = "ok " if r in ok else "BAD"
        say(f"  bad input {mark} {r['command']:23s} {r['case']:28s} exit {r['exit']} {r['seconds']:.2f} s")
    say(f"  bad input: pool memory after a refused adapter: {leaked:+d} B")
    met = len(ok) == len(rows) and leaked == 0
    return {
        "rows": rows,
        "pool_leak_bytes": leaked,
        "measured": f"{len(ok)}/{len(rows)} malformed inputs gave a clear error with no traceback or hang; "
        f"pool active memory after a refused adapter {leaked:+d} B",
        "met": met,
        "why": ("met" if met else "not met") + ": every case must exit non-zero with an error message, "
        f"no traceback, within {HANG_SECONDS} s, and leave the pool's memory as it was.",
    }


def _pool_leak(model: Path, wrong: Path) -> int:
    """Active memory left behind by a pool that refused an adapter and was then closed."""
    from mlxman.errors import MlxmanError
    from mlxman.pool import ModelPool

    with measured_active() as reading, ModelPool(64 * GIB) as pool:
        pool.load(str(model))
        try:
            with pool.acquire(str(model), str(wrong)):
                pass
        except MlxmanError:
            pass
    return reading["delta"]
