"""One rank of a sharded run, started by ``mlx.launch``: ``python -m mlxman.distributed.rank SPEC``.

Every rank runs the same steps in the same order (their collectives must match); rank 0 reports them as
events to the launching process. A rank that fails reports its own error and exits 1, which makes
``mlx.launch`` stop the others. A failed check all ranks agree on (versions, memory) is reported by rank 0.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from mlxman.distributed import protocol as ev
from mlxman.distributed.checks import RankShare, share_problems, version_problem
from mlxman.errors import ContextError, DistributedError, MemoryBudgetError, MlxmanError
from mlxman.settings import debug_enabled

# Bytes each rank's version line takes in the exchange.
VERSION_BYTES = 128
# Tokens (and prompt chunks) between two checks whether a request was cancelled: one sum over the ranks each.
CANCEL_CHECK_EVERY = 8


class Agreed(Exception):
    """An error every rank found from the same exchanged numbers: rank 0 reports it, the others leave."""

    def __init__(self, error: MlxmanError) -> None:
        super().__init__(error.message)
        self.error = error


def _gather_ints(group: Any, values: list[int]) -> list[list[int]]:
    import mlx.core as mx

    gathered = mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=group, stream=mx.cpu)
    rows: Any = gathered.tolist()
    return [[int(v) for v in row] for row in rows]


def _gather_strings(group: Any, text: str) -> list[str]:
    import mlx.core as mx

    raw = text.encode()[:VERSION_BYTES].ljust(VERSION_BYTES, b"\0")
    gathered = mx.distributed.all_gather(mx.array([list(raw)], dtype=mx.uint8), group=group, stream=mx.cpu)
    rows: Any = gathered.tolist()
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


def _broadcast_ints(group: Any, values: list[int] | None, rank: int) -> list[int]:
    """Rank 0's integers on every rank (a sum where the others add zeros)."""
    import mlx.core as mx

    count = mx.distributed.all_sum(
        mx.array(len(values) if rank == 0 and values else 0), group=group, stream=mx.cpu
    )
    n = int(count.item())  # type: ignore[arg-type]
    local = mx.array(values if rank == 0 and values else [0] * n, dtype=mx.int64)
    summed: Any = mx.distributed.all_sum(local, group=group, stream=mx.cpu).tolist()
    return [int(v) for v in summed]


class _Inbox:
    """Requests from stdin, read on a thread of their own so that a cancel arrives while a request runs.

    Every rank reads the same lines (mlx.launch copies the launcher's stdin to all of them), though not at
    the same moment: a cancel only marks its request; the ranks agree on when to stop (``_agreed_stop``).
    """

    def __init__(self) -> None:
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cancelled: set[str] = set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        reader = ev.RequestReader()
        for line in sys.stdin:
            message = reader.feed(line)
            if message is None:
                continue
            if message.get("cancel"):
                self.cancelled.add(str(message.get("id", "")))
            else:
                self.messages.put(message)
        self.messages.put({"quit": True})  # the launcher is gone

    def next(self) -> dict[str, Any]:
        return self.messages.get()


def _agreed_stop(group: Any, inbox: _Inbox, request_id: str, stream: Any) -> Any:
    """A ``should_stop`` for a generation: every few tokens the ranks sum their "cancelled" marks and all stop
    together at the same token (one rank stopping alone would leave the others waiting on it)."""
    import mlx.core as mx

    calls = 0

    def should_stop() -> bool:
        nonlocal calls
        calls += 1
        if calls % CANCEL_CHECK_EVERY:
            return False
        # mlx-lm runs a step ahead on its own stream: its collectives end before this one starts.
        mx.synchronize(stream)
        mark = mx.array(1 if request_id in inbox.cancelled else 0)
        total: Any = mx.distributed.all_sum(mark, group=group, stream=mx.cpu).item()
        return bool(total > 0)

    return should_stop


def version_line() -> str:
    import mlx.core as mx
    import mlx_lm

    import mlxman

    mlx_version, lm_version = getattr(mx, "__version__", "?"), getattr(mlx_lm, "__version__", "?")
    return f"mlxman {mlxman.__version__}, mlx {mlx_version}, mlx-lm {lm_version}"


def _budget(host_limit: str | None, flag: str | None) -> tuple[int, int]:
    from mlxman.memory import resolve_budget, system_memory
    from mlxman.settings import load_config

    memory = system_memory()
    budget = resolve_budget(host_limit or flag, load_config(), memory.total)
    return budget.limit_bytes, memory.available


def _init(backend: str) -> Any:
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"The {backend} backend did not start on {socket.gethostname()}: {exc}",
            "check the hostfile's IPs (ring) or RDMA devices (JACCL) and that the hosts reach each other",
        ) from None
    return group


def run(spec: dict[str, Any], rank: int) -> None:
    import mlx.core as mx

    from mlxman.adapters.config import read_adapter_config
    from mlxman.distributed.adapters import check_adapter, swap_sharded
    from mlxman.distributed.sharding import (
        kv_bytes_per_token,
        load_lazy,
        materialize,
        parameter_bytes,
        shard_model,
    )
    from mlxman.generate import GenerationRequest, TextGeneration, fit_context, prompt_tokens
    from mlxman.pool.estimate import activation_dtype_bytes, adapter_bytes, kv_cache_bytes, model_headers
    from mlxman.pool.swap import AdapterWeights, check_applicable, read_adapter

    hosts: list[str] = spec["hosts"]
    group = _init(spec["backend"])
    if group.size() != len(hosts):
        raise DistributedError(
            f"mlx.launch started {group.size()} ranks for {len(hosts)} hosts",
            "check the hostfile and backend",
        )
    problem = version_problem(_gather_strings(group, version_line()), hosts)
    if problem:
        raise Agreed(DistributedError(problem, "install the same mlxman and MLX versions on every host"))
    if rank == 0:
        ev.emit(ev.JOINED, size=group.size())

    model_dir = Path(spec["model"])
    started = time.perf_counter()
    model, config = load_lazy(model_dir)
    plan = shard_model(model, group, spec["mode"])
    adapters: list[str | None] = spec["adapters"]
    for adapter_path in adapters:  # refuse what this split cannot wear before any weight is read
        if adapter_path:
            path = Path(adapter_path)
            adapter_config = read_adapter_config(path)
            check_applicable(path, adapter_config)  # a PEFT adapter is named as such
            check_adapter(AdapterWeights(path, adapter_config, {}), plan, str(config.get("model_type")))
    headers = model_headers(model_dir)
    per_token = kv_bytes_per_token(model, activation_dtype_bytes(headers, config))
    context = int(spec["context_tokens"])
    weights = parameter_bytes(model)
    kv = kv_cache_bytes(per_token, context)
    most_adapter = max((adapter_bytes(Path(a)) for a in adapters if a), default=0)
    budget, available = _budget(spec["host_limits"][rank], spec.get("memory_limit"))
    rows = _gather_ints(group, [weights, kv, most_adapter, budget, available])
    shares = [RankShare(r, hosts[r], *row) for r, row in enumerate(rows)]
    if rank == 0:
        ev.emit(ev.SHARES, mode=plan.mode, rows=[dataclasses.asdict(s) for s in shares])
    problems = share_problems(shares)
    if problems:
        raise Agreed(
            MemoryBudgetError(
                "A rank's share does not fit its machine: " + "; ".join(problems),
                "add hosts, raise that host's memory_limit in the hostfile (or --memory-limit), "
                "or lower --context-length",
            )
        )

    before = mx.get_active_memory()
    materialize(model)
    measured = mx.get_active_memory() - before
    from mlx_lm.generate import generation_stream
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(  # type: ignore[no-untyped-call]
        model_dir, eos_token_ids=config.get("eos_token_id")
    )
    loaded = _gather_ints(group, [weights, measured, mx.get_active_memory()])
    if rank == 0:
        ev.emit(
            ev.LOADED,
            seconds=time.perf_counter() - started,
            rows=[
                {"rank": r, "host": hosts[r], "weights_bytes": w, "measured_bytes": m, "active_bytes": a}
                for r, (w, m, a) in enumerate(loaded)
            ],
        )

    if rank == 0:
        ev.emit(ev.READY)

    current = None
    inbox = _Inbox()
    while True:
        message = inbox.next()
        if message.get("quit"):
            break
        request_id = str(message.get("id", ""))
        adapter_path = message.get("adapter")
        if adapter_path not in adapters:
            raise DistributedError(f"Adapter {adapter_path} was not declared at start", "restart with it")
        request = GenerationRequest(**message["request"])
        # Every rank samples the same token only from the same random state: rank 0's seed goes to all.
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(6), "little")
        request = dataclasses.replace(request, seed=_broadcast_ints(group, [seed], rank)[0])
        tokens = _broadcast_ints(group, prompt_tokens(tokenizer, request) if rank == 0 else None, rank)
        try:
            tokens = fit_context(tokens, request, context, "shorten the prompt or lower max_tokens")
        except ContextError as exc:  # the same tokens on every rank: all refuse it and serve on
            if rank == 0:
                _report(rank, hosts[rank], exc, request_only=True)
            continue
        nxt = None
        if adapter_path:
            nxt = read_adapter(Path(adapter_path))
        swapped = swap_sharded(model, current, nxt, plan)
        current = swapped.applied
        del nxt  # the whole adapter: this rank keeps only its part
        if rank == 0:
            ev.emit(ev.ANSWER, adapter=adapter_path, swap=swapped.mode, swap_seconds=swapped.seconds)
        generation = TextGeneration(
            model, tokenizer, tokens, request, _agreed_stop(group, inbox, request_id, generation_stream)
        )
        for piece in generation:
            if rank == 0:
                ev.emit(ev.TEXT, text=piece)
        stats = generation.stats
        inbox.cancelled.discard(request_id)  # marks of ended requests would pile up on a long-lived rank
        # mlx-lm runs one step ahead on its own stream; its collectives must end before ours start.
        mx.synchronize(generation_stream)
        used = stats.prompt_tokens + stats.generation_tokens
        held = sum(int(w.nbytes) for w in current.adapter.weights.values()) if current else 0
        memory = _gather_ints(
            group, [kv_cache_bytes(per_token, used), held, mx.get_active_memory(), mx.get_peak_memory()]
        )
        if rank == 0:
            ev.emit(
                ev.ANSWER_END,
                stats=dataclasses.asdict(stats),
                rows=[
                    {
                        "rank": r,
                        "host": hosts[r],
                        "weights_bytes": loaded[r][0],
                        "kv_bytes": k,
                        "adapter_bytes": h,
                        "active_bytes": a,
                        "peak_bytes": p,
                    }
                    for r, (k, h, a, p) in enumerate(memory)
                ],
            )
    # Nobody leaves before everybody is done.
    mx.eval(mx.distributed.all_sum(mx.array(1), group=group, stream=mx.cpu))
    if rank == 0:
        ev.emit(ev.DONE)


def _report(
    rank: int, host: str, error: MlxmanError, peer_lost: bool = False, request_only: bool = False
) -> None:
    ev.emit(
        ev.ERROR,
        rank=rank,
        host=host,
        kind=type(error).__name__,
        message=error.message,
        hint=error.hint,
        peer_lost=peer_lost,
        request_only=request_only,
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("MLX_RANK", "0"))
    spec = ev.decode_spec(args[0])
    hosts = spec.get("hosts") or []
    host = hosts[rank] if rank < len(hosts) else socket.gethostname()
    ev.emit(ev.STARTED, rank=rank, host=host, pid=os.getpid())
    code = 0
    try:
        run(spec, rank)
    except Agreed as agreed:
        if rank == 0:
            _report(rank, host, agreed.error)
            code = 1
    except MlxmanError as exc:
        _report(rank, host, exc)
        code = 1
    except Exception as exc:  # an MLX or mlx-lm failure still reaches rank 0's command line as one line
        if debug_enabled():
            traceback.print_exc()
        # The ring backend raises this when another rank's socket closes: the launcher says which one died.
        lost = isinstance(exc, RuntimeError) and "peer was lost" in str(exc)
        what = (
            f"lost its connection to another rank ({exc})"
            if lost
            else f"unexpected {type(exc).__name__}: {exc}"
        )
        _report(
            rank,
            host,
            DistributedError(
                f"Rank {rank} ({host}) {what}", "run again with MLXMAN_DEBUG=1 for every rank's traceback"
            ),
            peer_lost=lost,
        )
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # MLX's distributed backends may block in interpreter teardown: leave now that everything is said.
    os._exit(code)


if __name__ == "__main__":
    main()
