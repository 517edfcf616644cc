"""Start the ranks of a sharded run through ``mlx.launch`` and follow rank 0's events, within bounded time.

Nothing here imports MLX: the launching process only starts ``mlx.launch``, reads the event lines, and turns
a rank's error, a rank's death, or a silence longer than the timeout into one ``MlxmanError``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

from mlxman import errors
from mlxman.distributed import protocol as ev
from mlxman.distributed.hostfile import Hostfile
from mlxman.errors import DistributedError, MlxmanError
from mlxman.settings import debug_enabled

# Seconds to wait for every rank to start and connect, and, once generating, for the next token.
DEFAULT_RANK_TIMEOUT = 60.0
# Seconds SSH gets to reach each host before the run starts.
SSH_CONNECT_SECONDS = 10
# Seconds the ranks get to leave after an error before their process group is killed.
LEAVE_SECONDS = 5.0
_NODE_EXIT = re.compile(r"Node with rank (\d+) (?:was killed|exited with code (-?\d+))")
_ERROR_KINDS: dict[str, type[MlxmanError]] = {
    name: cls
    for name in dir(errors)
    if isinstance(cls := getattr(errors, name), type) and issubclass(cls, MlxmanError)
}


@dataclass(frozen=True)
class ShardedJob:
    """A sharded generation: what every rank loads and runs, and where."""

    hostfile: Hostfile
    model_dir: Path
    adapters: tuple[str | None, ...]
    mode: str
    context_tokens: int
    memory_limit: str | None = None
    timeout: float = DEFAULT_RANK_TIMEOUT
    # The interpreter each host runs the ranks with: the same path on every host, as mlx.launch expects.
    python: str = field(default_factory=lambda: sys.executable)

    def spec(self) -> dict[str, Any]:
        return {
            "hosts": [h.ssh for h in self.hostfile.hosts],
            "host_limits": [h.memory_limit for h in self.hostfile.hosts],
            "backend": self.hostfile.backend,
            "model": str(self.model_dir),
            "adapters": list(self.adapters),
            "mode": self.mode,
            "context_tokens": self.context_tokens,
            "memory_limit": self.memory_limit,
        }


def mlx_launch_path() -> str:
    """``mlx.launch`` next to this interpreter (its own venv), else on PATH."""
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise DistributedError(
            "mlx.launch is not installed here", "install MLX (`pip install mlx`) in this environment"
        )
    return found


def _free_port(count: int) -> int:
    """A loopback port with ``count`` free ports from it (the ring backend takes one per rank)."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            start = int(s.getsockname()[1])
        if start + count >= 65535:
            continue
        try:
            for port in range(start + 1, start + count):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise DistributedError("No free local ports for the ring backend", "close some servers and try again")


def check_hosts_reachable(hostfile: Hostfile, seconds: int = SSH_CONNECT_SECONDS) -> None:
    """Every remote host answers SSH without a password prompt, all checked at once, in bounded time."""
    remote = [h for h in hostfile.hosts if not h.is_local]
    if not remote:
        return
    problems: dict[int, str] = {}

    def probe(rank: int, host: str) -> None:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={seconds}", host, "true"]
        try:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + 5, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            problems[rank] = f"rank {rank} ({host}) did not answer SSH within {seconds + 5} s"
            return
        except OSError as exc:
            problems[rank] = f"ssh cannot run here: {exc.strerror or exc}"
            return
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or ["exit code " + str(done.returncode)])[-1]
            problems[rank] = f"rank {rank} ({host}) cannot be reached by SSH: {said}"

    threads = [threading.Thread(target=probe, args=(h.rank, h.ssh), daemon=True) for h in remote]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if problems:
        raise DistributedError(
            "; ".join(problems[r] for r in sorted(problems)),
            "check the host names in the hostfile and that `ssh HOST true` works without a password "
            "(see docs/distributed.md)",
        )


def launch_command(job: ShardedJob, port: int | None) -> list[str]:
    cmd = [mlx_launch_path(), "--hostfile", str(job.hostfile.path), "--backend", job.hostfile.backend]
    cmd += ["--python", job.python]
    if port is not None:
        cmd += ["--starting-port", str(port)]
    return [*cmd, "--", "-m", "mlxman.distributed.rank", ev.encode_spec(job.spec())]


def _pump(stream: IO[bytes], name: str, lines: queue.Queue[tuple[str, str | None]]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put((name, raw.decode(errors="replace").rstrip("\r\n")))
    lines.put((name, None))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop mlx.launch and the ranks it started (one process group of our own making)."""
    for sig, wait in ((signal.SIGTERM, LEAVE_SECONDS), (signal.SIGKILL, LEAVE_SECONDS)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class _Follow:
    """What the ranks have said so far."""

    def __init__(self, job: ShardedJob) -> None:
        self.hosts = [h.ssh for h in job.hostfile.hosts]
        self.started: set[int] = set()
        self.joined = False
        self.loaded = False
        self.done = False
        self.error: dict[str, Any] | None = None
        self.exits: dict[int, int | None] = {}
        self.tail: deque[str] = deque(maxlen=20)

    def label(self, rank: int) -> str:
        host = self.hosts[rank] if 0 <= rank < len(self.hosts) else "?"
        return f"rank {rank} ({host})"


def _error_from_event(event: dict[str, Any], follow: _Follow) -> MlxmanError:
    cls = _ERROR_KINDS.get(str(event.get("kind")), DistributedError)
    message = str(event.get("message", "a rank failed"))
    rank = event.get("rank")
    if isinstance(rank, int) and rank != 0 and not message.lower().startswith("rank"):
        message = f"{follow.label(rank).capitalize()}: {message}"
    hint = event.get("hint")
    return cls(message, str(hint) if hint else None)


def _death(follow: _Follow, reporter: int | None = None) -> MlxmanError | None:
    """What to say about a rank that died (not ``reporter``, which saw it go), or None when none did."""
    # The rank that failed first did not end by mlx.launch's SIGTERM (-15), nor by its own error (1).
    exits = [(r, c) for r, c in sorted(follow.exits.items()) if r != reporter and c != 0]
    failed = [(r, c) for r, c in exits if c not in (1, -signal.SIGTERM)] or exits
    when = "while generating" if follow.loaded else "while loading" if follow.joined else "while starting"
    if failed:
        rank, code = failed[0]
        how = (
            f"was killed by signal {-code}"
            if isinstance(code, int) and code < 0
            else f"exited with code {code}"
            if code is not None
            else "was killed"
        )
        return DistributedError(
            f"{follow.label(rank).capitalize()} {how} {when}; the run stopped on every rank",
            "check that host, then run again (MLXMAN_DEBUG=1 shows every rank's output)",
        )
    if reporter is not None:
        return None
    last = follow.tail[-1] if follow.tail else "no output"
    return DistributedError(
        f"The sharded run ended {when} without a result ({last})",
        "run again with MLXMAN_DEBUG=1 to see every rank's output",
    )


class RankGroup:
    """The ranks of one sharded model, started once and asked one request at a time.

    Every method ends within bounded time: a rank's error, a rank's death, or a silence longer than the
    job's timeout raises ``MlxmanError`` and, unless only that request was refused, leaves the group down.
    """

    def __init__(self, job: ShardedJob) -> None:
        self.job = job
        self.follow = _Follow(job)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.open_streams = 0
        self.down: MlxmanError | None = None
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()

    @property
    def up(self) -> bool:
        return self.proc is not None and self.down is None and self.open_streams == 2

    def start(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Launch every rank and wait until rank 0 says the model is loaded on all of them."""
        check_hosts_reachable(self.job.hostfile)
        port = _free_port(len(self.job.hostfile.hosts)) if self.job.hostfile.all_local else None
        self.proc = subprocess.Popen(
            launch_command(self.job, port),
            # Requests go to the ranks through mlx.launch's stdin (it copies it to every rank).
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err")):
            threading.Thread(target=_pump, args=(stream, name, self.lines), daemon=True).start()
        self.open_streams = 2
        self._until(ev.READY, on_event, starting=True)

    def ask(
        self,
        adapter: str | None,
        request: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None],
        request_id: str = "",
    ) -> None:
        """Run one generation on every rank; rank 0's events go to ``on_event`` until its answer ends."""
        with self.lock:
            if not self.up:
                raise self.down or DistributedError("The ranks are not running", "start them again")
            self._write(ev.request_lines({"id": request_id, "adapter": adapter, "request": request}))
            self._until(ev.ANSWER_END, on_event, starting=False)

    def cancel(self, request_id: str) -> None:
        """Ask the ranks to stop that request at their next agreed check; its answer ends "cancelled"."""
        if self.up:
            with contextlib.suppress(MlxmanError):
                self._write(ev.request_lines({"cancel": True, "id": request_id}))

    def close(self) -> None:
        """Ask the ranks to leave; whatever has not left in time is killed."""
        if self.proc is None:
            return
        if self.up:
            with contextlib.suppress(MlxmanError):
                self._write(ev.request_lines({"quit": True}))
                self._until(ev.DONE, lambda _e: None, starting=False, seconds=LEAVE_SECONDS * 2)
        self._stop()

    def _write(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            with self.write_lock:
                self.proc.stdin.write(text.encode())
                self.proc.stdin.flush()
        except OSError:
            self._fail(DistributedError("The ranks are gone", "start them again"))

    def _stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            _kill_group(self.proc)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def _fail(self, error: MlxmanError) -> NoReturn:
        self.down = error
        self._stop()
        raise error

    def _until(
        self,
        kind: str,
        on_event: Callable[[dict[str, Any]], None],
        *,
        starting: bool,
        seconds: float | None = None,
    ) -> None:
        """Pass rank 0's events on until one of ``kind``; raise on an error, a death or a silence."""
        try:
            self._follow(kind, on_event, starting, seconds)
        except BaseException as exc:
            if isinstance(exc, MlxmanError) and getattr(exc, "request_only", False):
                raise
            self.down = exc if isinstance(exc, MlxmanError) else DistributedError("Interrupted")
            self._stop()
            raise

    def _follow(
        self, kind: str, on_event: Callable[[dict[str, Any]], None], starting: bool, seconds: float | None
    ) -> None:
        follow, job = self.follow, self.job
        debug = debug_enabled()
        last = started = time.monotonic()
        error_at: float | None = None
        while self.open_streams:
            now = time.monotonic()
            if error_at is not None:
                deadline = error_at + LEAVE_SECONDS
            elif seconds is not None:
                deadline = started + seconds
            elif starting and not follow.joined:
                deadline = started + job.timeout
            elif starting:
                deadline = float(
                    "inf"
                )  # a large model reads for minutes; a rank that dies ends the run anyway
            else:
                deadline = last + job.timeout
            try:
                stream, line = self.lines.get(timeout=max(0.0, min(deadline - now, 1.0)))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    if error_at is not None:
                        break  # the error is known; the ranks that did not leave are killed
                    raise _timeout(job, follow, starting) from None
                continue
            if line is None:
                self.open_streams -= 1
                continue
            event = ev.parse_event(line) if stream == "out" else None
            if event is None:
                match = _NODE_EXIT.search(line)
                if match:
                    follow.exits[int(match.group(1))] = int(match.group(2)) if match.group(2) else None
                elif line.strip():
                    follow.tail.append(line.strip())
                    if debug:
                        print(line, file=sys.stderr)
                continue
            last = time.monotonic()
            name = event["event"]
            if name == ev.STARTED and isinstance(event.get("rank"), int):
                follow.started.add(event["rank"])
            elif name == ev.JOINED:
                follow.joined = True
            elif name == ev.LOADED:
                follow.loaded = True
            elif name == ev.DONE:
                follow.done = True
            elif name == ev.ERROR:
                if event.get("request_only"):
                    error = _error_from_event(event, follow)
                    error.request_only = True  # type: ignore[attr-defined]
                    raise error
                if follow.error is None:
                    follow.error = event
                    error_at = last
                continue
            if error_at is None:
                on_event(event)
                if name == kind:
                    return
        if follow.error is not None:
            died = _death(follow, follow.error.get("rank")) if follow.error.get("peer_lost") else None
            raise died or _error_from_event(follow.error, follow)
        if kind == ev.DONE and follow.done:
            return
        raise _death(follow) or DistributedError("The ranks ended without a result")


def run_sharded(
    job: ShardedJob,
    asks: list[tuple[str | None, dict[str, Any]]],
    on_event: Callable[[dict[str, Any]], None],
) -> None:
    """Start the ranks, run each (adapter, request) on all of them in turn, then stop them."""
    group = RankGroup(job)
    try:
        group.start(on_event)
        for adapter, request in asks:
            group.ask(adapter, request, on_event)
    finally:
        group.close()


def _timeout(job: ShardedJob, follow: _Follow, starting: bool) -> DistributedError:
    seconds = f"{job.timeout:g} s"
    if starting and not follow.joined:
        missing = [r for r in range(len(follow.hosts)) if r not in follow.started]
        if missing:
            names = ", ".join(follow.label(r) for r in missing)
            return DistributedError(
                f"{names} did not start within {seconds}",
                f"check that mlxman is installed at {job.python} on that host and the model is at "
                f"{job.model_dir} there",
            )
        return DistributedError(
            f"The ranks started but did not connect to each other within {seconds}",
            f"check the hostfile's IPs ({job.hostfile.backend} backend) and that no firewall blocks them",
        )
    return DistributedError(
        f"No answer from the ranks for {seconds}: a rank stopped responding",
        "check every host; raise --rank-timeout for very slow links",
    )
