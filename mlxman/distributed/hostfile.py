"""The hostfile ``mlx.distributed_config`` writes: read, checked, every problem listed at once."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.errors import UsageError
from mlxman.files import FileProblem, read_json
from mlxman.memory import parse_size

BACKENDS = ("ring", "jaccl")
DEFAULT_BACKEND = "ring"
# A few hosts' names, IPs and RDMA devices: a few KB even for a large cluster.
HOSTFILE_MAX_BYTES = 1024 * 1024
# mlx.launch runs a host named exactly this on the local machine, without SSH.
LOCAL_HOST = "127.0.0.1"
EXAMPLE = (
    '{"backend": "ring", "hosts": '
    '[{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]}'
)


@dataclass(frozen=True)
class Host:
    """One rank's machine: how to reach it by SSH, the IPs the ring uses, its RDMA devices (JACCL)."""

    rank: int
    ssh: str
    ips: tuple[str, ...]
    rdma: tuple[Any, ...] = ()
    # mlxman's own optional key: this machine's memory budget (a size such as 48GB, or 75%).
    memory_limit: str | None = None

    @property
    def is_local(self) -> bool:
        return self.ssh == LOCAL_HOST

    @property
    def label(self) -> str:
        return f"rank {self.rank} ({self.ssh})"


@dataclass(frozen=True)
class Hostfile:
    path: Path
    hosts: tuple[Host, ...]
    backend: str
    envs: tuple[str, ...] = field(default=())

    @property
    def all_local(self) -> bool:
        return all(h.is_local for h in self.hosts)


def _problem(path: Path, problems: list[str]) -> UsageError:
    listed = "; ".join(problems[:6]) + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else "")
    return UsageError(
        f"Hostfile {path} is malformed: {listed}",
        f"write it with `mlx.distributed_config` or by hand, e.g. {EXAMPLE}",
    )


def _json_type(value: Any) -> str:
    """What JSON calls the type of a decoded value (``null``, not Python's ``NoneType``)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _host(index: int, raw: Any, problems: list[str]) -> Host | None:
    where = f"hosts[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where} is a JSON {_json_type(raw)}, not an object with 'ssh' and 'ips'")
        return None
    ssh = raw.get("ssh")
    if not isinstance(ssh, str) or not ssh.strip():
        problems.append(f"{where} has no 'ssh' host name")
        ssh = ""
    elif ssh.startswith("-") or any(c.isspace() for c in ssh):
        problems.append(f"{where} has an unusable 'ssh' host name {ssh!r}")
    ips = raw.get("ips", [])
    if not _strings(ips):
        problems.append(f"{where}.ips must be a list of IP addresses")
        ips = []
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            problems.append(f"{where}.ips holds {ip!r}, which is not an IP address")
    rdma = raw.get("rdma", [])
    if not isinstance(rdma, list) or not all(r is None or isinstance(r, (str, list)) for r in rdma):
        problems.append(f"{where}.rdma must be a list of RDMA device names or null")
        rdma = []
    limit = raw.get("memory_limit")
    if limit is not None:
        try:
            if isinstance(limit, str) and limit.endswith("%"):
                parse_size(limit, total_bytes=100)
            else:
                parse_size(limit)
        except UsageError as exc:
            problems.append(f"{where}.memory_limit: {exc.message}")
            limit = None
    return Host(index, ssh, tuple(ips), tuple(rdma), None if limit is None else str(limit))


def parse_hostfile(doc: Any, path: Path, backend: str | None = None) -> Hostfile:
    """Check a decoded hostfile against the backend that will use it; UsageError listing every problem."""
    problems: list[str] = []
    envs: Any = []
    file_backend: Any = None
    if isinstance(doc, dict):
        raw_hosts = doc.get("hosts")
        envs = doc.get("envs", [])
        file_backend = doc.get("backend") or None
        if not isinstance(raw_hosts, list):
            raise _problem(path, ["it has no 'hosts' list"])
    elif isinstance(doc, list):
        raw_hosts = doc
    else:
        raise _problem(path, [f"it holds a JSON {_json_type(doc)}, not a list of hosts"])
    if not _strings(envs) or not all("=" in e for e in envs):
        problems.append("'envs' must be a list of NAME=VALUE strings")
        envs = []
    chosen = backend or file_backend or DEFAULT_BACKEND
    if chosen not in BACKENDS:
        raise UsageError(
            f"Backend {chosen!r} is not supported for a sharded run", f"use one of {', '.join(BACKENDS)}"
        )
    hosts = [h for i, raw in enumerate(raw_hosts) if (h := _host(i, raw, problems)) is not None]
    if len(raw_hosts) < 2:
        problems.append(f"it lists {len(raw_hosts)} host(s); a sharded run needs at least 2")
    if chosen == "ring":
        missing = [str(h.rank) for h in hosts if not h.ips]
        if missing:
            problems.append(
                f"the ring backend needs 'ips' for every host; hosts[{', '.join(missing)}] have none"
            )
    else:
        n = len(raw_hosts)
        if hosts and not hosts[0].ips:
            problems.append("JACCL needs an IP for hosts[0], which coordinates the others")
        for h in hosts:
            if len(h.rdma) != n:
                problems.append(
                    f"hosts[{h.rank}].rdma lists {len(h.rdma)} devices; JACCL needs one per host ({n})"
                )
            elif h.rdma[h.rank] is not None:
                problems.append(f"hosts[{h.rank}].rdma[{h.rank}] must be null (a host has no link to itself)")
    if problems:
        raise _problem(path, problems)
    return Hostfile(path=path, hosts=tuple(hosts), backend=chosen, envs=tuple(envs))


def read_hostfile(path: Path, backend: str | None = None) -> Hostfile:
    """Read and check ``path`` (bounded, through the one file reader)."""
    try:
        doc = read_json(path, HOSTFILE_MAX_BYTES, "a hostfile")
    except FileProblem as exc:
        raise UsageError(
            f"Hostfile {exc}", "pass --hosts with the JSON file mlx.distributed_config writes"
        ) from None
    except ValueError as exc:
        raise UsageError(f"Hostfile {path} {exc}", f"a hostfile looks like {EXAMPLE}") from None
    return parse_hostfile(doc, path, backend)
