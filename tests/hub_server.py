"""A local stand-in for the Hugging Face Hub: the HTTP calls huggingface_hub makes to find and download files.

Emulated (as the Hub answers them, per huggingface_hub's own client code):
- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true`` adds sizes): id, sha, gated, siblings.
- ``GET /api/models/{repo}/tree/{rev}``: the flat file list (no pagination: every repo here is small).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1 for small
  files), ``Content-Length``, ``Accept-Ranges``. Weights (``*.safetensors``, ``*.bin``) answer as LFS files
  on the Hub do: a 302 to a "CDN" on another host name (``localhost`` instead of ``127.0.0.1``) carrying
  ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the CDN serves the bytes with ``Range`` support
  (206 and ``Content-Range``).
- Errors with the Hub's ``X-Error-Code`` headers: an unknown repo is 401 ``RepoNotFound`` (what the Hub
  tells an anonymous client), an unknown revision 404 ``RevisionNotFound``, a missing file 404
  ``EntryNotFound``, a gated repo's files 401 or 403 ``GatedRepo`` (its metadata stays readable, as on the
  Hub), and a bare 403 for a repo the test forbids.
- Faults a test asks for: a connection dropped partway through a file (once), a file that stalls halfway
  until released (to interrupt the client mid-file), or a file served short (a whole response, half the
  size the metadata announced).

Not emulated: authentication and tokens, Xet storage (no ``X-Xet-*`` headers, so the client uses plain
HTTP), pagination, commits and uploads, rate limits, gzip, and any endpoint a download does not call.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
STALL_SECONDS = 60.0


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    gated: bool = False
    # What a gated repo's files answer: 401 to an anonymous client, 403 to a token without access.
    gated_status: int = 401
    forbidden: bool = False  # every call answers a bare 403 (no error code), as a proxy or a disabled repo
    branches: dict[str, str] = field(default_factory=dict)  # extra branch or tag -> commit (main is added)

    @property
    def sha(self) -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + sha256(self.files[name]).encode())
        return digest.hexdigest()

    def commit_of(self, revision: str) -> str | None:
        if revision in ("main", self.sha) or (len(revision) >= 7 and self.sha.startswith(revision)):
            return self.sha
        return self.branches.get(revision)

    @staticmethod
    def from_folder(repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> HubRepo:
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return HubRepo(repo_id, {**files, **(extra or {})})


# Hashes are kept per content (a bytes object caches its own hash, so a lookup costs nothing after the first):
# every API call names every file's hashes, and a 200 MB shard would otherwise be hashed on each.
@functools.cache
def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(name: str) -> bool:
    return name.endswith(LFS_SUFFIXES)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    host: str


class LocalHub:
    """A threaded HTTP server on 127.0.0.1 that serves ``repos``; ``url`` is what HF_ENDPOINT takes."""

    def __init__(self, repos: list[HubRepo]) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.requests: list[Request] = []
        self.drop_once: dict[str, int] = {}  # file name -> bytes sent before its first body is cut off
        self.stall: set[str] = set()  # file names whose body stops halfway until `release` is set
        self.short: set[str] = set()  # file names served cut in half, as a whole (shorter) response
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            owner = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> LocalHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def downloads(self, name: str) -> list[Request]:
        """The GETs of a file's bytes (from the CDN for weights, else from /resolve)."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + name)]

    def blob(self, digest: str) -> tuple[str, bytes] | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if sha256(data) == digest:
                    return name, data
        return None


@contextmanager
def local_hub(repos: list[HubRepo]) -> Iterator[LocalHub]:
    hub = LocalHub(repos).start()
    try:
        yield hub
    finally:
        hub.stop()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<what>revision|tree)/(?P<rev>[^/]+))?/?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})/(?P<file>.+)$")


class _Handler(BaseHTTPRequestHandler):
    owner: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the test log is the requests list
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.owner.log(Request(self.command, path, self.headers.get("Range"), self.headers.get("Host", "")))
        if m := _CDN.match(path):
            return self._cdn(m["sha"], body)
        if m := _API.match(path):
            return self._api(m["repo"], m["what"], m["rev"] or "main", body)
        if m := _RESOLVE.match(path):
            return self._resolve(m["repo"], m["rev"], m["file"], body)
        self._error(404, None, "Not Found", body)

    def _repo(self, repo_id: str, body: bool) -> HubRepo | None:
        repo = self.owner.repos.get(repo_id)
        if repo is None:
            self._error(401, "RepoNotFound", "Repository not found", body)
        elif repo.forbidden:
            self._error(403, None, "Forbidden", body)
            return None
        return repo

    def _api(self, repo_id: str, what: str | None, rev: str, body: bool) -> None:
        repo = self._repo(repo_id, body)
        if repo is None:
            return
        commit = repo.commit_of(unquote(rev))
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id", body)
        blobs = "blobs=true" in (urlsplit(self.path).query or "").lower() or what == "tree"
        entries = [self._entry(name, data, blobs) for name, data in sorted(repo.files.items())]
        if what == "tree":
            doc: Any = [{"type": "file", "path": e["rfilename"], **e} for e in entries]
        else:
            doc = {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "siblings": entries,
            }
        self._json(doc, body)

    @staticmethod
    def _entry(name: str, data: bytes, blobs: bool) -> dict[str, Any]:
        entry: dict[str, Any] = {"rfilename": name}
        if blobs:
            entry.update(size=len(data), oid=git_blob_sha(data), blobId=git_blob_sha(data))
            if is_lfs(name):  # the tree listing names the sha256 `oid`, the model info `sha256`
                digest = sha256(data)
                entry["lfs"] = {"oid": digest, "sha256": digest, "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, body)
        if repo is None:
            return
        commit = repo.commit_of(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id", body)
        if repo.gated:
            return self._error(
                repo.gated_status, "GatedRepo", f"Access to model {repo_id} is restricted.", body, commit
            )
        data = repo.files.get(name)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, commit)
        if is_lfs(name):
            digest = sha256(data)
            self.send_response(302)
            self.send_header("Location", f"{self.owner.cdn}/cdn/{digest}/{name}")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("X-Linked-Etag", f'"{digest}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{git_blob_sha(data)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._bytes(name, data, body, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(data)}"'})

    def _cdn(self, digest: str, body: bool) -> None:
        found = self.owner.blob(digest)
        if found is None:
            return self._error(404, None, "NoSuchKey", body)
        name, data = found
        self._bytes(name, data, body, {"ETag": f'"{digest}"'})

    def _bytes(self, name: str, data: bytes, body: bool, headers: dict[str, str]) -> None:
        start = 0
        wanted = self.headers.get("Range")
        if wanted and (m := re.fullmatch(r"bytes=(\d+)-", wanted.strip())):
            start = int(m[1])
        if start > len(data):
            return self._error(416, None, "Range Not Satisfiable", body)
        part = data[start:]
        if name in self.owner.short and self.command == "GET":
            part = part[: len(part) // 2]
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(part)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        owner = self.owner
        half = len(part) // 2
        if name in owner.drop_once and self.command == "GET":
            self.wfile.write(part[: owner.drop_once.pop(name) - start])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the body end early: a dropped connection
            return
        if name in owner.stall and self.command == "GET":
            self.wfile.write(part[:half])
            self.wfile.flush()
            owner.stalled.set()
            owner.release.wait(STALL_SECONDS)
            self.close_connection = True
            return
        self.wfile.write(part)

    def _json(self, doc: Any, body: bool) -> None:
        raw = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)

    def _error(
        self, status: int, code: str | None, message: str, body: bool, commit: str | None = None
    ) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if body:
            self.wfile.write(raw)
