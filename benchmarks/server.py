"""6. Serving under load: ``mlxman serve`` against ``python -m mlx_lm server``, side by side on one model.

Both servers run at once on the same random-weight llama, each in its own process; every cell (a case and a
number of clients) runs on one, then on the other, the order alternating from cell to cell and round to round,
so drift on a shared machine hits both alike. Requests go through the official ``openai`` client, streamed,
greedy, with the same prompts and ``max_tokens``; each load prompt is new to both servers (a repeated prompt
would let mlx-lm's prompt cache skip its prefill, which is the prefix case's business). Cases: one base; 2, 4
and 8 LoRA adapters spread over the clients; and a multi-turn chat under a long shared system prompt, whose
second turn is timed against the same turn under a system prompt no earlier request shares (so no prefix can
be reused).

``python -m benchmarks --only server [--quick]`` runs it in the suite; ``python -m benchmarks.server`` runs it
alone and prints the results (``--help``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Settings, median, ratio, say
from benchmarks.models import ModelSpec, build_model, synthesize_adapter
from benchmarks.startup import mlxman_command

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 900.0
# A shape where one forward step costs real time on a CPU (the measurement): 22.5M parameters.
SPEC = ModelSpec("h512x8", hidden=512, heads=8, kv_heads=2, intermediate=1408, layers=8)
DTYPE = "float32"
ADAPTER_RANK = 8
PROMPTS = (
    "Tell me something about the weather and the sea.",
    "What is the best way to learn a language?",
    "Write a line about mountains.",
    "Name three colours and a number.",
    "How do birds find their way home?",
    "Describe a quiet morning.",
    "What makes a good story?",
    "Say something kind.",
)
SIDES = ("mlx_lm", "mlxman")
# Ratios against their targets: (key, what, target, ">=" or "<="). The verdicts are computed from the run.
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("one_client", "1 client, one base: mlxman / mlx-lm aggregate tok/s", 1.0, ">="),
    ("eight_base", "8 clients, one base: mlxman / mlx-lm aggregate tok/s", 1.0, ">="),
    ("eight_4_adapters", "8 clients over 4 adapters: mlxman / mlx-lm aggregate tok/s", 1.5, ">="),
    (
        "eight_4_adapters_vs_base",
        "8 clients over 4 adapters / 8 clients on one base, both mlxman",
        0.9,
        ">=",
    ),
    ("prefix", "mlxman second-turn TTFT, shared prefix / fresh prefix (p50, 1 client)", 0.5, "<="),
)


@dataclass(frozen=True)
class Plan:
    """What one run measures: the quick plan keeps the cells the targets need and shrinks the rest."""

    clients: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    # Client counts at which every adapter count runs; 4 adapters (the targets' case) runs at all ``clients``.
    adapter_clients: tuple[int, ...]
    prefix_clients: tuple[int, ...]
    requests_per_client: dict[int, int]
    max_tokens: int
    rounds: int
    system_rules: int

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(
                clients=(1, 4, 8),
                adapter_counts=(2, 4, 8),
                adapter_clients=(8,),
                prefix_clients=(1,),
                requests_per_client={1: 2, 4: 1, 8: 1},
                max_tokens=16,
                rounds=1,
                system_rules=4,
            )
        return cls(
            clients=(1, 4, 8, 16),
            adapter_counts=(2, 4, 8),
            adapter_clients=(1, 4, 8, 16),
            prefix_clients=(1, 4),
            requests_per_client={1: 4, 4: 2, 8: 2, 16: 1},
            max_tokens=48,
            rounds=1,
            system_rules=8,
        )

    def cells(self) -> list[tuple[int, int]]:
        """(adapters, clients) pairs in run order; 0 adapters is the plain base."""
        out = [(0, c) for c in self.clients]
        for n in self.adapter_counts:
            out += [(n, c) for c in self.clients if n == 4 or c in self.adapter_clients]
        return out


def case_name(adapters: int) -> str:
    return "one base" if adapters == 0 else f"{adapters} adapters"


def system_prompt(rules: int) -> str:
    """A long system prompt of numbered house rules, the same for every client."""
    topics = ("orders", "returns", "shipping", "payments", "accounts", "warranty", "stock", "gift cards")
    styles = ("briefly", "politely", "with the exact figures", "in plain words", "step by step", "calmly")
    lines = ["You are the assistant of a small shop that sells tea, kettles and cups. Follow these rules."]
    for k in range(rules):
        lines.append(
            f"Rule {k + 1}: when a customer asks about {topics[k % len(topics)]}, answer "
            f"{styles[k % len(styles)]}, and never promise what the shop cannot keep."
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The two servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be killed when the benchmark dies, so no server outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextmanager
def _process(
    argv: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool], what: str
) -> Iterator[int]:
    """Start ``argv``, wait until ``ready()``; always stop it (SIGINT, then SIGKILL) on the way out."""
    with log.open("w") as err:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not ready():
                if proc.poll() is not None:
                    raise RuntimeError(f"{what} exited {proc.returncode} before it was ready; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} was not ready in {START_TIMEOUT_S:.0f} s; see {log}")
                time.sleep(0.25)
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _answers(url: str, check: Callable[[Any], bool] = lambda _: True) -> Callable[[], bool]:
    import httpx

    def ready() -> bool:
        try:
            response = httpx.get(url, timeout=5)
            return response.status_code == 200 and check(response.json())
        except (httpx.HTTPError, ValueError):
            return False

    return ready


@contextmanager
def running_server(
    preload: list[str], log: Path, extra: list[str] | None = None, pid: list[int] | None = None
) -> Iterator[str]:
    """``mlxman serve`` as a subprocess on a free port, preloading (and so allowing) ``preload``; yields /v1.

    ``extra`` adds serve flags; ``pid``, when given, receives the server's process id.
    """
    port = free_port()
    argv = [*mlxman_command(), "serve", "--port", str(port), "--keep-alive", "-1", *(extra or [])]
    for key in preload:
        argv += ["--preload", key]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mlxman-bench-home-") as home:
        env = {**os.environ, "MLXMAN_HOME": home, "HF_HUB_OFFLINE": "1"}
        env.pop("MLXMAN_API_KEY", None)
        with _process(argv, env, log, _answers(f"{base}/health"), "mlxman serve") as child:
            if pid is not None:
                pid.append(child)
            yield f"{base}/v1"


@contextmanager
def running_mlx_lm(model: Path, log: Path, pid: list[int] | None = None) -> Iterator[str]:
    """``python -m mlx_lm server --model M`` on a free port, its defaults; ready once /v1/models lists M."""
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="mlx-lm-bench-hub-") as hub:
        # /v1/models scans the Hugging Face cache: an empty one of its own keeps it fast and offline.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": hub}
        listed = _answers(
            f"{base}/v1/models", lambda data: str(model.resolve()) in {m.get("id") for m in data["data"]}
        )
        with _process(argv, env, log, listed, "mlx_lm server") as child:
            if pid is not None:
                pid.append(child)
            yield f"{base}/v1"


@dataclass(frozen=True)
class Side:
    """One server, and how a request names the base or an adapter on it."""

    name: str
    url: str
    model: Path
    pid: int

    def route(self, adapter: Path | None) -> tuple[str, dict[str, Any]]:
        if self.name == "mlxman":
            return (f"{self.model}::{adapter}" if adapter else str(self.model)), {}
        # mlx-lm names the model as given to --model (so it is not reloaded) and the adapter in "adapters".
        return str(self.model), ({"adapters": str(adapter)} if adapter else {})


def process_reading(pid: int) -> dict[str, int]:
    import psutil

    proc = psutil.Process(pid)
    return {"threads": proc.num_threads(), "rss_bytes": int(proc.memory_info().rss)}


def log_problems(log: Path, limit: int = 8) -> list[str]:
    """Lines of a server's log that say something went wrong (first ``limit``)."""
    marks = ("Traceback", "ERROR", "Error", "Exception", " 500 ", " 503 ", " 429 ")
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    return [line[:300] for line in lines if any(m in line for m in marks)][:limit]


# ---------------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Reply:
    client: int
    index: int
    ttft: float | None = None
    seconds: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None


def stream_chat(
    client: Any, side: Side, adapter: Path | None, messages: list[dict[str, str]], max_tokens: int
) -> Reply:
    """One streamed, greedy chat completion; time to first token is to the first chunk carrying text."""
    model, extra = side.route(adapter)
    reply = Reply(0, 0)
    start = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra or None,
        )
        pieces = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if reply.ttft is None:
                    reply.ttft = time.perf_counter() - start
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                reply.completion_tokens = int(chunk.usage.completion_tokens)
                reply.prompt_tokens = int(chunk.usage.prompt_tokens)
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                if details is not None and details.cached_tokens is not None:
                    reply.cached_tokens = int(details.cached_tokens)
        reply.text = "".join(pieces)
        if not reply.completion_tokens:
            reply.error = "the stream ended without a usage chunk"
    except Exception as exc:  # a failed request is a finding to report, not a reason to stop measuring
        reply.error = f"{type(exc).__name__}: {exc}"[:300]
    reply.seconds = time.perf_counter() - start
    return reply


def openai_client(url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)


# One client's requests: (adapter, messages) in order.
Script = list[tuple[Path | None, list[dict[str, str]]]]


def run_clients(side: Side, scripts: list[Script], max_tokens: int) -> tuple[list[Reply], float]:
    """Each script on its own thread with its own client, all released at once; (replies, wall seconds)."""
    barrier = threading.Barrier(len(scripts) + 1)

    def one(i: int) -> list[Reply]:
        client = openai_client(side.url)
        barrier.wait()
        out = []
        for j, (adapter, messages) in enumerate(scripts[i]):
            reply = stream_chat(client, side, adapter, messages, max_tokens)
            reply.client, reply.index = i, j
            out.append(reply)
        client.close()
        return out

    with ThreadPoolExecutor(len(scripts)) as pool:
        futures = [pool.submit(one, i) for i in range(len(scripts))]
        barrier.wait()
        start = time.perf_counter()
        replies = [r for f in futures for r in f.result()]
        seconds = time.perf_counter() - start
    return replies, seconds


def percentile(samples: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(replies: list[Reply], seconds: float) -> dict[str, Any]:
    ok = [r for r in replies if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(replies),
        "tokens": tokens,
        "seconds": seconds,
        "tps": tokens / seconds if seconds else 0.0,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p95": percentile(ttfts, 0.95),
        "prompt_tokens": sorted({r.prompt_tokens for r in ok}),
        "errors": [r.error for r in replies if r.error],
    }


def tag() -> str:
    """A fresh tag to put in front of a prompt: nothing sent before shares a prefix with it (past the
    chat template's first tokens), so no prompt cache can skip its prefill."""
    return f"[{uuid.uuid4().hex[:8]}] "


def load_scripts(adapters: list[Path], clients: int, per_client: int) -> list[Script]:
    """Client i sends PROMPTS[i] behind a fresh tag; the k-th request overall goes to adapter k mod n.
    Both servers get the same scripts, so the same prompts, and neither sees a prompt twice."""
    scripts: list[Script] = []
    for i in range(clients):
        script: Script = []
        for j in range(per_client):
            adapter = adapters[(j * clients + i) % len(adapters)] if adapters else None
            script.append((adapter, [{"role": "user", "content": tag() + PROMPTS[i % len(PROMPTS)]}]))
        scripts.append(script)
    return scripts


def same_text(a: list[Reply], b: list[Reply]) -> float:
    """Share of requests whose greedy text is identical on both sides."""
    theirs = {(r.client, r.index): r.text for r in b if r.error is None}
    pairs = [
        (r.text, theirs[(r.client, r.index)]) for r in a if r.error is None and (r.client, r.index) in theirs
    ]
    return sum(x == y for x, y in pairs) / len(pairs) if pairs else 0.0


# ---------------------------------------------------------------------------------------------------------
# The cases


@dataclass
class Cell:
    adapters: int
    clients: int
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in SIDES})
    same_text: list[float] = field(default_factory=list)


def measure_cell(
    cell: Cell, sides: dict[str, Side], adapters: list[Path], plan: Plan, order: tuple[str, ...]
) -> None:
    per_client = plan.requests_per_client[cell.clients]
    scripts = load_scripts(adapters[: cell.adapters], cell.clients, per_client)
    replies = {}
    for name in order:
        replies[name], seconds = run_clients(sides[name], scripts, plan.max_tokens)
        # The server's OS threads after each cell: a thread per request would show as steady growth.
        cell.runs[name].append({**summary(replies[name], seconds), **process_reading(sides[name].pid)})
    cell.same_text.append(same_text(replies["mlxman"], replies["mlx_lm"]))


def _fmt_ttft(run: dict[str, Any]) -> str:
    p50, p95 = run["ttft_p50"], run["ttft_p95"]
    return "-" if p50 is None else f"{p50 * 1000:.0f}/{p95 * 1000:.0f} ms"


def cell_result(cell: Cell) -> dict[str, Any]:
    """Medians over rounds per side; the ratio is the median of each round's mlxman / mlx-lm."""
    out: dict[str, Any] = {
        "case": case_name(cell.adapters),
        "adapters": cell.adapters,
        "clients": cell.clients,
    }
    for name in SIDES:
        runs = cell.runs[name]
        out[name] = {
            "tps": median([r["tps"] for r in runs]),
            "ttft_p50": _median_or_none([r["ttft_p50"] for r in runs]),
            "ttft_p95": _median_or_none([r["ttft_p95"] for r in runs]),
            "requests": runs[0]["requests"],
            "tokens": runs[0]["tokens"],
            "prompt_tokens": runs[0]["prompt_tokens"],
            "errors": [e for r in runs for e in r["errors"]],
            "rounds": runs,
        }
    paired = [
        ratio(m["tps"], x["tps"]) for m, x in zip(cell.runs["mlxman"], cell.runs["mlx_lm"], strict=True)
    ]
    out["ratio"] = median(paired)
    out["same_text"] = median(cell.same_text)
    return out


def _median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median(present) if present else None


def measure_prefix(side: Side, clients: int, system: str, max_tokens: int) -> dict[str, Any]:
    """Three phases, clients concurrent in each: turn 1 under the shared system prompt; turn 2 of the same
    chats (the prefix an earlier request saw); turn 2 again under a system prompt nobody sent before.

    Every system prompt starts with a tag of the same length: one shared by this run's chats, so an earlier
    run's cache does not help its first turn, and a fresh one per request for the last phase."""
    shared_tag = tag()
    first: list[Script] = [
        [
            (
                None,
                [
                    {"role": "system", "content": shared_tag + system},
                    {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
                ],
            )
        ]
        for i in range(clients)
    ]
    turn1, _ = run_clients(side, first, max_tokens)
    by_client = {r.client: r for r in turn1}

    def second(fresh: bool) -> list[Script]:
        scripts: list[Script] = []
        for i in range(clients):
            messages = [
                {"role": "system", "content": (tag() if fresh else shared_tag) + system},
                {"role": "user", "content": PROMPTS[i % len(PROMPTS)]},
                {"role": "assistant", "content": by_client[i].text},
                {"role": "user", "content": "Thank you. And what would you say to a new customer?"},
            ]
            scripts.append([(None, messages)])
        return scripts

    shared, shared_s = run_clients(side, second(fresh=False), max_tokens)
    fresh, fresh_s = run_clients(side, second(fresh=True), max_tokens)
    t1, t2, t3 = summary(turn1, 0.0), summary(shared, shared_s), summary(fresh, fresh_s)
    return {
        "clients": clients,
        "first_turn": t1,
        "shared_prefix": t2,
        "fresh_prefix": t3,
        "cached_tokens": [r.cached_tokens for r in shared if r.error is None],
        "ratio": ratio(t2["ttft_p50"] or 0.0, t3["ttft_p50"] or 0.0),
    }


# ---------------------------------------------------------------------------------------------------------
# The run


def build(root: Path, count: int) -> tuple[Path, list[Path]]:
    model = build_model(root, SPEC, DTYPE)
    adapters = [
        synthesize_adapter(model, root / f"{model.name}-lora{i}", rank=ADAPTER_RANK, seed=100 + i)
        for i in range(count)
    ]
    return model.resolve(), [a.resolve() for a in adapters]


def ratios(load: list[dict[str, Any]], prefix: list[dict[str, Any]]) -> dict[str, float | None]:
    def cell(adapters: int, clients: int) -> dict[str, Any] | None:
        return next((r for r in load if r["adapters"] == adapters and r["clients"] == clients), None)

    one, eight, mixed = cell(0, 1), cell(0, 8), cell(4, 8)
    alone = next((p for p in prefix if p["clients"] == 1), None)
    return {
        "one_client": one["ratio"] if one else None,
        "eight_base": eight["ratio"] if eight else None,
        "eight_4_adapters": mixed["ratio"] if mixed else None,
        "eight_4_adapters_vs_base": (
            ratio(mixed["mlxman"]["tps"], eight["mlxman"]["tps"]) if mixed and eight else None
        ),
        "prefix": alone["mlxman"]["ratio"] if alone else None,
    }


def verdicts(found: dict[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for key, what, target, direction in TARGETS:
        value = found.get(key)
        met = None if value is None else (value >= target if direction == ">=" else value <= target)
        out.append(
            {"key": key, "what": what, "target": target, "direction": direction, "value": value, "met": met}
        )
    return out


def measure(plan: Plan, work: Path) -> dict[str, Any]:
    model, adapters = build(work / "models", max(plan.adapter_counts))
    keys = [str(model)] + [f"{model}::{a}" for a in adapters]
    system = system_prompt(plan.system_rules)
    logs = {"mlxman": work / "serve-mlxman.log", "mlx_lm": work / "serve-mlx-lm.log"}
    with ExitStack() as stack:
        pids: dict[str, list[int]] = {"mlxman": [], "mlx_lm": []}
        urls = {
            "mlx_lm": stack.enter_context(running_mlx_lm(model, logs["mlx_lm"], pids["mlx_lm"])),
            "mlxman": stack.enter_context(running_server(keys, logs["mlxman"], pid=pids["mlxman"])),
        }
        sides = {n: Side(n, urls[n], model, pids[n][0]) for n in SIDES}
        say(f"  servers up: mlx-lm {urls['mlx_lm']}, mlxman {urls['mlxman']}; model {model.name}")
        for side in sides.values():  # warm-up: first-call compilation, the base, one adapter
            with openai_client(side.url) as client:
                for adapter in (None, adapters[0], None):
                    hello = [{"role": "user", "content": PROMPTS[0]}]
                    warm = stream_chat(client, side, adapter, hello, 4)
                    if warm.error:
                        raise RuntimeError(f"{side.name} failed its warm-up request: {warm.error}")
        before = {n: process_reading(s.pid) for n, s in sides.items()}
        cells = [Cell(a, c) for a, c in plan.cells()]
        for r in range(plan.rounds):
            for k, cell in enumerate(cells):
                order = SIDES if (k + r) % 2 == 0 else SIDES[::-1]
                measure_cell(cell, sides, adapters, plan, order)
                last = {n: cell.runs[n][-1] for n in SIDES}
                say(
                    f"  {case_name(cell.adapters):>10}, {cell.clients:2d} client(s): "
                    f"mlx-lm {last['mlx_lm']['tps']:6.1f} tok/s (TTFT p50/p95 {_fmt_ttft(last['mlx_lm'])}), "
                    f"mlxman {last['mlxman']['tps']:6.1f} tok/s (TTFT {_fmt_ttft(last['mlxman'])}) -> "
                    f"{ratio(last['mlxman']['tps'], last['mlx_lm']['tps']):.2f}x" + _errors_note(last)
                )
        prefix = []
        for k, clients in enumerate(plan.prefix_clients):
            row: dict[str, Any] = {"clients": clients}
            for name in SIDES if k % 2 == 0 else SIDES[::-1]:
                row[name] = measure_prefix(sides[name], clients, system, plan.max_tokens)
            prefix.append(row)
            say(
                f"  shared system prompt ({row['mlxman']['fresh_prefix']['prompt_tokens']} prompt tokens), "
                f"{clients} client(s), second turn TTFT p50 shared / fresh prefix: "
                + ", ".join(
                    f"{n} {_ms(row[n]['shared_prefix']['ttft_p50'])} / "
                    f"{_ms(row[n]['fresh_prefix']['ttft_p50'])} = {row[n]['ratio']:.2f}x"
                    for n in SIDES
                )
            )
        after = {n: process_reading(s.pid) for n, s in sides.items()}
    load = [cell_result(c) for c in cells]
    found = ratios(load, prefix)
    checked = verdicts(found)
    say("  targets:")
    for v in checked:
        value = "not measured" if v["value"] is None else f"{v['value']:.3f}x"
        state = "n/a" if v["met"] is None else ("met" if v["met"] else "NOT MET")
        say(f"    {state:>7}: {v['what']} = {value} (target {v['direction']} {v['target']})")
    return {
        "model": model.name,
        "spec": asdict(SPEC),
        "dtype": DTYPE,
        "adapter_rank": ADAPTER_RANK,
        "max_tokens": plan.max_tokens,
        "rounds": plan.rounds,
        "plan": {
            **asdict(plan),
            "requests_per_client": {str(k): v for k, v in plan.requests_per_client.items()},
        },
        "load": load,
        "prefix": prefix,
        "ratios": found,
        "verdicts": checked,
        "servers": {
            n: {
                "before": before[n],
                "after": after[n],
                "threads_by_cell": [c.runs[n][r]["threads"] for r in range(plan.rounds) for c in cells],
                "log_problems": log_problems(logs[n]),
            }
            for n in SIDES
        },
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _errors_note(last: dict[str, dict[str, Any]]) -> str:
    failed = {n: len(r["errors"]) for n, r in last.items() if r["errors"]}
    return "".join(f"; {n}: {k} request(s) FAILED ({last[n]['errors'][0]})" for n, k in failed.items())


def run(settings: Settings) -> dict[str, Any]:
    return measure(Plan.for_mode(settings.quick), settings.work)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="the suite's quick plan (fewer clients and tokens)"
    )
    parser.add_argument("--clients", help="client counts, e.g. 1,8 (default: the plan's)")
    parser.add_argument("--rounds", type=int, help="rounds of every cell (default: the plan's)")
    parser.add_argument("--tokens", type=int, help="max_tokens per request (default: the plan's)")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = Plan.for_mode(args.quick)
    changes: dict[str, Any] = {}
    if args.clients:
        clients = tuple(int(c) for c in args.clients.split(","))
        changes["clients"] = clients
        changes["adapter_clients"] = tuple(c for c in plan.adapter_clients if c in clients) or clients[-1:]
        changes["requests_per_client"] = {c: plan.requests_per_client.get(c, 1) for c in clients}
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.tokens:
        changes["max_tokens"] = args.tokens
    plan = Plan(**{**asdict(plan), **changes})
    args.work.mkdir(parents=True, exist_ok=True)
    result = measure(plan, args.work)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
