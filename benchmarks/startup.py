"""5. CLI start-up of ``mlxman --help``, ``status``, ``ls`` and ``adapter validate`` vs ``import mlx_lm``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Settings, median, ratio, say
from benchmarks.models import build_model, synthesize_adapter


def mlxman_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m mlxman``."""
    script = Path(sys.executable).parent / "mlxman"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlxman"]


def run(settings: Settings) -> dict[str, Any]:
    root = settings.work / "models"
    model = build_model(root, settings.sizes[0], "float16")
    adapter = synthesize_adapter(model, root / f"{model.name}-lora0", seed=100)
    mlxman = mlxman_command()
    commands = {
        "python -c 'import mlx_lm'": [sys.executable, "-c", "import mlx_lm"],
        "python -c 'pass'": [sys.executable, "-c", "pass"],
        "mlxman --help": [*mlxman, "--help"],
        "mlxman status": [*mlxman, "status"],
        "mlxman ls": [*mlxman, "ls"],
        "mlxman adapter validate": [*mlxman, "adapter", "validate", str(adapter), "--model", str(model)],
    }
    samples: dict[str, list[float]] = {k: [] for k in commands}
    with tempfile.TemporaryDirectory(prefix="mlxman-bench-home-") as home:
        # `ls` lists a model folder holding the model and the adapter (its config naming the model), and an
        # empty Hugging Face cache: what is measured does not depend on this machine's cache.
        library = Path(home) / "models"
        (library / model.name).mkdir(parents=True)
        for file in model.iterdir():
            (library / model.name / file.name).symlink_to(file)
        copy = Path(shutil.copytree(adapter, library / adapter.name))
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "model": str(library / model.name)}))
        (Path(home) / "hf-cache").mkdir()
        env = {
            **os.environ,
            "MLXMAN_HOME": home,
            "HF_HUB_OFFLINE": "1",
            "MLXMAN_MODEL_DIRS": str(library),
            "HF_HUB_CACHE": str(Path(home) / "hf-cache"),
        }
        # As an installed package runs: from byte-compiled modules (the warm-up writes any missing).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        for argv in commands.values():  # warm-up: the page cache, .pyc files
            subprocess.run(argv, env=env, capture_output=True, check=False)
        for _ in range(settings.startup_repeats):
            for name, argv in commands.items():
                start = time.perf_counter()
                done = subprocess.run(argv, env=env, capture_output=True, check=False)
                samples[name].append(time.perf_counter() - start)
                if done.returncode != 0:
                    raise RuntimeError(f"{name} exited {done.returncode}: {done.stderr.decode()[-1000:]}")
    seconds = {k: median(v) for k, v in samples.items()}
    baseline = seconds["python -c 'import mlx_lm'"]
    rows: list[dict[str, Any]] = [
        {"command": k, "seconds": s, "ratio": ratio(s, baseline)} for k, s in seconds.items()
    ]
    for row in rows:
        say(
            f"  start-up {row['command']:28s} {row['seconds'] * 1000:8.1f} ms"
            f"  ({row['ratio']:.2f}x import mlx_lm)"
        )
    return {"rows": rows, "baseline": "python -c 'import mlx_lm'"}
