"""Write an output folder safely: never over its own inputs, built beside it, moved in whole, no leftovers."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from mlxman.errors import UsageError

T = TypeVar("T")
LOCK_SUFFIX = ".lock"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _lineage(path: Path) -> list[tuple[int, int]]:
    """The identities of ``path`` (when it exists) and of every existing folder above it."""
    found = []
    for p in (path, *path.absolute().parents):
        ident = _identity(p)
        if ident is not None:
            found.append(ident)
    return found


def _follow(dst: Path) -> Path:
    """A symlinked destination means its target: the link stays, the folder it names is written."""
    if not dst.is_symlink():
        return dst
    target = dst.resolve()
    if not target.exists():
        raise UsageError(f"{dst} is a symbolic link to {target}, which does not exist", "pass a folder")
    return target


def check_destination(dst: Path, inputs: Iterable[tuple[str, Path]], force: bool) -> Path:
    """The folder to write (a symlink is followed to its target); UsageError when writing there is unsafe.

    ``inputs`` are (what, path) pairs the command reads: the destination may not be one of them, hold one,
    or lie inside one, whatever the spelling (symlinks, ``..``, case-insensitive file systems).
    """
    dst = _follow(dst)
    own = _identity(dst)
    above = _lineage(dst.parent)
    for what, path in inputs:
        theirs = _identity(path)
        if theirs is None:
            continue
        if own == theirs:
            raise UsageError(f"{dst} is the {what} itself", f"write to a new folder; the {what} stays as is")
        if own is not None and own in _lineage(path)[1:]:
            raise UsageError(
                f"{dst} holds the {what} ({path})",
                f"write to a new folder{'; --force would delete the ' + what if force else ''}",
            )
        if theirs in above:
            raise UsageError(f"{dst} is inside the {what} ({path})", f"write to a folder outside the {what}")
    if dst.exists() and not force and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"{dst} already exists and is not empty", "pick a new folder, or pass --force")
    return dst


def write_folder(dst: Path, build: Callable[[Path], T], *, prefix: str, replace: bool = False) -> T:
    """Run ``build`` on a fresh folder beside ``dst``, then move it to ``dst`` in one rename.

    An existing ``dst`` is replaced only when ``replace`` (or when it is an empty folder). The folder gets
    the user's umask like any mkdir. Interrupted runs (Ctrl-C, SIGTERM) leave nothing; a killed run leaves
    a staging folder that the next write into the same parent removes.
    """
    dst = _follow(dst)
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"Cannot create {parent}: {exc.strerror or exc}", "pick a folder you can write to"
        ) from None
    remove_stale(parent, prefix)
    with _claimed(parent, prefix) as (staging, trash), _signals_interrupt():
        result = build(staging)
        if os.path.lexists(dst):
            if not replace and not (dst.is_dir() and not any(dst.iterdir())):
                raise UsageError(f"{dst} appeared while writing", "pick a new folder, or pass --force")
            os.replace(dst, trash)  # out of the way first, so dst is never half-deleted
        try:
            os.replace(staging, dst)
        except OSError as exc:
            if os.path.lexists(trash):
                os.replace(trash, dst)
            raise UsageError(f"Cannot write {dst}: {exc.strerror or exc}", "pick another folder") from None
    return result


@contextlib.contextmanager
def _claimed(parent: Path, prefix: str) -> Iterator[tuple[Path, Path]]:
    """A staging folder and a trash name, both owned through a held lock file until the block ends."""
    name, fd = _lock_new(parent, prefix)
    lock = parent / (name + LOCK_SUFFIX)
    staging, trash = parent / name, parent / f"{name}-old"
    try:
        os.mkdir(staging)  # mode 0777 less the umask, as any folder the user makes
        yield staging, trash
    finally:
        for leftover in (staging, trash):
            _remove(leftover)
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _lock_new(parent: Path, prefix: str) -> tuple[str, int]:
    """A fresh name whose lock file exists and is held by us before any folder of that name does."""
    while True:
        name = f"{prefix}{secrets.token_hex(8)}"
        lock = parent / (name + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except OSError as exc:
            raise UsageError(
                f"Cannot write in {parent}: {exc.strerror or exc}", "pick a folder you can write to"
            ) from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _holds(fd, lock):
            return name, fd
        os.close(fd)  # a cleaner took the new lock for a stale one in between: pick another name


def _holds(fd: int, lock: Path) -> bool:
    """Is ``lock`` still the file ``fd`` has open (not unlinked or replaced meanwhile)?"""
    try:
        st, ours = lock.stat(follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove what killed writes left in ``parent`` under ``prefix``: only what no live process holds."""
    removed: list[Path] = []
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return removed
    stems = {e.name.removesuffix(LOCK_SUFFIX).removesuffix("-old") for e in entries}
    for stem in sorted(stems):
        lock = parent / (stem + LOCK_SUFFIX)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o666)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    continue  # a live write holds it
                raise
            if not _holds(fd, lock):
                continue
            for leftover in (parent / stem, parent / f"{stem}-old"):
                if _remove(leftover):
                    removed.append(leftover)
            with contextlib.suppress(OSError):
                lock.unlink()
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _remove(path: Path) -> bool:
    """Remove a staging leftover; a symlink is unlinked, never followed."""
    try:
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            return False
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """While writing, SIGTERM and SIGHUP interrupt like Ctrl-C, so the cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:  # never take over a server's own handlers
            old[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
