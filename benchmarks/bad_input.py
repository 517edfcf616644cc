"""7. Bad input: malformed adapters and models through the real CLI and the pool; clear errors, no traces."""

from __future__ import annotations

import contextlib
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
# Requests sent to watch the server's OS thread count (it must stay flat: no thread per request).
THREAD_REQUESTS = 200
THREAD_SLACK = 4


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
                rows.append(
                    {
                        "class": "adapter",
                        "case": name,
                        "command": f"mlxman {command}",
                        **_judge(argv, env, places),
                    }
                )
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
            rows.append(
                {"class": "argument", "case": name, "command": "mlxman generate", **_judge(argv, env, places)}
            )
        rows += _special_file_rows(work, model, good, mlxman, env, places)
        leaked = _pool_leak(model, cases["wrong shapes for the base"])
        server = _server_rows(work, model, good, places)
        rows += server["rows"]
    ok = [r for r in rows if r["clear"] and not r["traceback"] and not r["hang"]]
    for r in rows:
        mark = "ok " if r in ok else "BAD"
        say(f"  bad input {mark} {r['command']:23s} {r['case']:28s} exit {r['exit']} {r['seconds']:.2f} s")
    say(f"  bad input: pool memory after a refused adapter: {leaked:+d} B")
    threads = server["threads"]
    say(
        f"  bad input: server OS threads {threads['before']} -> {threads['after']} "
        f"over {threads['requests']} requests"
    )
    flat = threads["after"] <= threads["before"] + THREAD_SLACK
    met = len(ok) == len(rows) and leaked == 0 and flat
    return {
        "rows": rows,
        "pool_leak_bytes": leaked,
        "threads": threads,
        "measured": f"{len(ok)}/{len(rows)} malformed inputs gave a clear error with no traceback or hang; "
        f"pool active memory after a refused adapter {leaked:+d} B; server threads "
        f"{threads['before']} -> {threads['after']} over {threads['requests']} requests",
        "met": met,
        "why": ("met" if met else "not met") + ": every case must exit non-zero (HTTP: the expected 4xx, the "
        f"connection still usable) with an error message, no traceback, within {HANG_SECONDS} s, leave the "
        f"pool's memory as it was, and the server's thread count must stay within {THREAD_SLACK} of its "
        "warm count.",
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


def _special_file_rows(
    work: Path, model: Path, good: Path, mlxman: list[str], env: dict[str, str], places: dict[str, str]
) -> list[dict[str, Any]]:
    """Model and adapter folders holding special or hostile files: each must fail fast and clearly."""
    rows: list[dict[str, Any]] = []

    def model_copy(name: str) -> Path:
        out = work / "special" / name
        shutil.copytree(model, out, symlinks=True)
        return out

    def gen(model_dir: Path | str, adapter: Path | None = None) -> list[str]:
        argv = [*mlxman, "generate", "--model", str(model_dir), "-p", "hi", "--max-tokens", "2"]
        return argv + (["--adapter", str(adapter)] if adapter else [])

    fifo = model_copy("tokenizer.json a FIFO")
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    zero = model_copy("tokenizer.json to dev-zero")
    (zero / "tokenizer.json").unlink()
    (zero / "tokenizer.json").symlink_to("/dev/zero")
    sparse = model_copy("sparse 4 GiB config.json")
    with (sparse / "config.json").open("r+b") as f:
        f.truncate(4 * GIB)
    deep = model_copy("config.json nested 100k deep")
    depth = 100_000
    (deep / "config.json").write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    loop = model_copy("weights a symlink loop")
    for weights in loop.glob("model*.safetensors"):
        weights.unlink()
        weights.symlink_to(weights.name)
    long_name = work / "special" / ("m" * 300)
    adapter_fifo = work / "special" / "adapter weights a FIFO"
    shutil.copytree(good, adapter_fifo)
    (adapter_fifo / "adapters.safetensors").unlink()
    os.mkfifo(adapter_fifo / "adapters.safetensors")
    adapter_loop = work / "special" / "adapter folder a symlink loop"
    adapter_loop.symlink_to(adapter_loop.name)
    same = work / "special" / "convert onto itself"
    shutil.copytree(good, same)
    cases: dict[str, list[str]] = {
        "tokenizer.json is a FIFO": gen(fifo),
        "tokenizer.json links to /dev/zero": gen(zero),
        "config.json is a sparse 4 GiB file": gen(sparse),
        "config.json nested 100,000 deep": gen(deep),
        "weights file is a symlink loop": gen(loop),
        "path component of 300 characters": gen(long_name),
        "adapter weights file is a FIFO": [*mlxman, "adapter", "validate", str(adapter_fifo)],
        "adapter folder is a symlink loop": [*mlxman, "adapter", "validate", str(adapter_loop)],
        "convert SRC SRC --force": [
            *mlxman,
            "adapter",
            "convert",
            str(same),
            str(same),
            "--to",
            "peft",
            "--force",
        ],
    }
    for name, argv in cases.items():
        row = {
            "class": "special file",
            "case": name,
            "command": " ".join(["mlxman", *argv[len(mlxman) : len(mlxman) + 2]]),
        }
        row["command"] = row["command"].replace(" --model", "")
        rows.append({**row, **_judge(argv, env, places)})
    # The source of a refused convert must still be whole.
    if not (same / "adapters.safetensors").is_file():
        rows[-1]["clear"] = False
        rows[-1]["message"] = "the source adapter was destroyed"
    return rows


def _server_rows(work: Path, model: Path, good: Path, places: dict[str, str]) -> dict[str, Any]:
    """Hostile HTTP requests against a real ``mlxman serve`` with a key, roots and a small context."""
    import threading

    import httpx
    import psutil

    from benchmarks.server import running_server

    root = work / "root"
    root.mkdir()
    served = root / "model"
    shutil.copytree(model, served)
    adapter = root / "adapter"
    shutil.copytree(good, adapter)
    fifo_model = root / "fifo-model"
    shutil.copytree(model, fifo_model)
    (fifo_model / "tokenizer.json").unlink()
    os.mkfifo(fifo_model / "tokenizer.json")
    outside = work / "outside-model"
    shutil.copytree(model, outside)
    key = "bench-key"
    context = 512
    pid: list[int] = []
    rows: list[dict[str, Any]] = []
    places = {**places, str(root): "ROOT"}
    extra = ["--adapter-root", str(root), "--api-key-env", "BENCH_KEY", "--context-length", str(context)]
    os.environ["BENCH_KEY"] = key
    auth = {"Authorization": f"Bearer {key}"}
    with running_server([str(served)], work / "server.log", extra, pid) as url:
        base = url.removesuffix("/v1")
        model_id = str(served.resolve())
        with httpx.Client(base_url=base, headers=auth, timeout=HANG_SECONDS) as client:

            def check(case: str, expect: int, method: str, path: str, **kwargs: Any) -> None:
                start = time.perf_counter()
                try:
                    response = client.request(method, path, **kwargs)
                    status, text = response.status_code, response.text
                except httpx.HTTPError as exc:
                    status, text = 0, f"{type(exc).__name__}: {exc}"
                seconds = time.perf_counter() - start
                try:
                    usable = client.get("/v1/models").status_code == 200
                except httpx.HTTPError:
                    usable = False
                message = text
                with contextlib.suppress(Exception):
                    message = response.json()["error"]["message"]
                for where, name in places.items():
                    message = message.replace(where, name)
                rows.append(
                    {
                        "class": "request",
                        "case": case,
                        "command": f"{method} {path}",
                        "exit": status,
                        "clear": status == expect and usable and bool(message),
                        "traceback": "Traceback" in text,
                        "hang": False,
                        "seconds": seconds,
                        "message": f"HTTP {status}: {message}"[:200],
                    }
                )

            completion = {"model": model_id, "prompt": "hi", "max_tokens": 2}
            check("seed -1", 400, "POST", "/v1/completions", json={**completion, "seed": -1})
            check("seed 2**64", 400, "POST", "/v1/completions", json={**completion, "seed": 2**64})
            check("Host header [::1", 400, "GET", "/v1/models", headers={"Host": "[::1"})
            check(
                "prompt + max_tokens over the context",
                400,
                "POST",
                "/v1/completions",
                json={**completion, "prompt": "hello " * (2 * context)},
            )

            def chunks() -> Any:
                for _ in range(20):
                    yield b" " * (1024 * 1024)

            check("chunked body over 16 MiB", 413, "POST", "/v1/completions", content=chunks())
            check(
                "no key, 16 MiB body",
                401,
                "POST",
                "/v1/completions",
                content=b" " * (16 * 1024 * 1024),
                headers={"Authorization": ""},
            )
            check(
                "load a path outside the roots", 403, "POST", "/api/pool/load", json={"model": str(outside)}
            )
            check(
                "estimate a missing path outside the roots",
                403,
                "POST",
                "/api/pool/estimate",
                json={"model": str(work / "missing")},
            )
            check(
                "model in a root with a FIFO tokenizer",
                400,
                "POST",
                "/api/pool/load",
                json={"model": str(fifo_model)},
            )
            check(
                "path component of 300 characters",
                400,
                "POST",
                "/v1/completions",
                json={**completion, "model": "m" * 300},
            )
            # An in-use entry cannot be unloaded: a long stream holds it meanwhile.
            started = threading.Event()

            def hold() -> None:
                body = {**completion, "max_tokens": context // 2, "stream": True}
                with httpx.stream("POST", f"{url}/completions", json=body, headers=auth, timeout=120) as r:
                    for _ in r.iter_lines():
                        started.set()

            holder = threading.Thread(target=hold)
            holder.start()
            started.wait(60)
            check("unload an entry in use", 409, "POST", "/api/pool/unload", json={"key": model_id})
            holder.join()
            # Threads: warm up, then watch the count over many requests alternating adapters.
            process = psutil.Process(pid[0])
            names = [model_id, f"{model_id}::{adapter.resolve()}"]
            for i in range(10):
                client.post("/v1/completions", json={**completion, "model": names[i % 2], "max_tokens": 1})
            before = process.num_threads()
            for i in range(THREAD_REQUESTS):
                client.post("/v1/completions", json={**completion, "model": names[i % 2], "max_tokens": 1})
            after = process.num_threads()
    os.environ.pop("BENCH_KEY", None)
    threads = {"before": before, "after": after, "requests": THREAD_REQUESTS}
    return {"rows": rows, "threads": threads}
