"""Commands that write a folder (adapter convert, adapter fuse, the demo kit): never over their inputs,
the user's umask, symlinked destinations, and no staging folder left behind, even when interrupted."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.staging import remove_stale, write_folder
from tests.adapter_corpus import copy_adapter
from tests.helpers import run_cli


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _leftovers(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith((".converting-", ".fusing-", ".building-"))
    )


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _clean_error(result, code: int, *words: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.stdout + result.stderr
    text = " ".join(result.stderr.split())
    assert "bug" not in text and "Traceback" not in text, text
    for word in words:
        assert word in text, text


@pytest.fixture
def adapter(demo_kit: DemoKit, tmp_path: Path) -> Path:
    return copy_adapter(demo_kit.adapters["colors"], tmp_path / "work" / "colors")


def _convert(src: Path, dst: Path, *extra: str):  # type: ignore[no-untyped-def]
    return run_cli("adapter", "convert", str(src), str(dst), "--to", "peft", *extra)


def test_convert_onto_its_own_source_is_refused(adapter: Path) -> None:
    before = _digest(adapter)
    for force in ((), ("--force",)):
        _clean_error(_convert(adapter, adapter, *force), 2, "is the adapter being converted itself")
        # The same folder spelled another way, and through a symlink to it.
        _clean_error(_convert(adapter, adapter / ".." / adapter.name, *force), 2, "itself")
        link = adapter.parent / "link"
        link.symlink_to(adapter)
        _clean_error(_convert(adapter, link, *force), 2, "itself")
        link.unlink()
    assert _digest(adapter) == before


def test_convert_into_a_folder_holding_its_source_is_refused(adapter: Path) -> None:
    before = _digest(adapter)
    _clean_error(
        _convert(adapter, adapter.parent, "--force"), 2, "holds the adapter being converted", "--force"
    )
    _clean_error(_convert(adapter, adapter.parent.parent, "--force"), 2, "holds the adapter")
    _clean_error(_convert(adapter, adapter / "peft"), 2, "is inside the adapter")
    _clean_error(_convert(adapter, adapter / "adapters.safetensors", "--force"), 2, "inside the adapter")
    assert _digest(adapter) == before


def test_convert_onto_its_base_model_is_refused(demo_kit: DemoKit, tmp_path: Path) -> None:
    peft = tmp_path / "peft"
    assert _convert(demo_kit.adapters["colors"], peft).exit_code == 0
    model = shutil.copytree(demo_kit.model, tmp_path / "model")
    before = _digest(model)
    result = run_cli(
        "adapter", "convert", str(peft), str(model), "--to", "mlx", "--model", str(model), "--force"
    )
    _clean_error(result, 2, "is the base model itself")
    assert _digest(model) == before


def test_convert_output_honours_the_umask(adapter: Path, tmp_path: Path) -> None:
    for mask, mode in ((0o022, 0o755), (0o077, 0o700), (0o002, 0o775)):
        dst = tmp_path / f"out-{mask:o}"
        with _umask(mask):
            assert _convert(adapter, dst).exit_code == 0
        assert stat.S_IMODE(dst.stat().st_mode) == mode
        # Files: as the writers make them (mlx's safetensors writer asks for 0644), within the umask.
        assert all(stat.S_IMODE(f.stat().st_mode) & mask == 0 for f in dst.iterdir())


def test_convert_through_a_symlinked_destination(adapter: Path, tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert _convert(adapter, link).exit_code == 0
    assert link.is_symlink() and (target / "adapter_model.safetensors").is_file()
    result = _convert(adapter, link)
    _clean_error(result, 2, "already exists", "--force")
    assert _convert(adapter, link, "--force").exit_code == 0
    assert link.is_symlink() and (target / "adapter_config.json").is_file()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    _clean_error(_convert(adapter, dangling), 2, "symbolic link", "does not exist")
    (tmp_path / "a-file").write_text("x")
    _clean_error(_convert(adapter, tmp_path / "a-file" / "out"), 2, "a-file")
    assert _leftovers(tmp_path) == []


def test_force_replaces_an_existing_output_whole(adapter: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    assert _convert(adapter, dst, "--force").exit_code == 0
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path) == []


_KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from mlxman.staging import write_folder

    def build(staging):
        (staging / "partial").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)

    write_folder(Path(sys.argv[1]), build, prefix=".converting-")
    """
)


def test_stale_staging_folders_are_removed_and_live_ones_kept(adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "outs"
    out.mkdir()
    # One left by a killed run (its lock file stays, unheld), one by an older mlxman (no lock file).
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(out / "killed")], check=False)
    assert killed.returncode == -signal.SIGKILL
    (out / ".converting-k2j3h4x").mkdir()
    (out / ".converting-k2j3h4x" / "adapters.safetensors").write_text("x")
    assert len([p for p in _leftovers(out) if not p.endswith(".lock")]) == 2
    # A write in progress in another process holds its lock: it must survive.
    live = out / ".converting-live"
    live.mkdir()
    lock = os.open(out / ".converting-live.lock", os.O_CREAT | os.O_WRONLY)
    hold = f"import fcntl, time; fcntl.flock({lock}, fcntl.LOCK_EX); print(1, flush=True); time.sleep(600)"
    held = subprocess.Popen([sys.executable, "-c", hold], pass_fds=(lock,), stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None and held.stdout.readline().strip() == "1"
        assert _convert(adapter, out / "new").exit_code == 0
        assert _leftovers(out) == [".converting-live", ".converting-live.lock"]
    finally:
        held.kill()
        held.wait()
        os.close(lock)
    assert remove_stale(out, ".converting-") == [live]
    assert _leftovers(out) == []


def test_interrupted_write_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM and Ctrl-C during a write end it as an interruption, with the staging folder removed."""

    def terminated(staging: Path) -> None:
        (staging / "partial").write_text("half")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    def ctrl_c(staging: Path) -> None:
        (staging / "partial").write_text("half")
        raise KeyboardInterrupt

    parent = tmp_path / "outs"
    for build in (terminated, ctrl_c):
        with pytest.raises(KeyboardInterrupt):
            write_folder(parent / "out", build, prefix=".converting-")
        assert sorted(p.name for p in parent.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_convert_interrupted_by_sigterm_in_a_subprocess(adapter: Path, tmp_path: Path) -> None:
    """The real CLI, stopped by SIGTERM while it writes: exit 130 as for Ctrl-C, nothing left behind."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import mlxman.adapters.convert as convert
        from mlxman.cli.app import app

        real = convert._mlx_to_peft

        def slow(*args):
            result = real(*args)
            os.kill(os.getpid(), signal.SIGTERM)
            return result

        convert._mlx_to_peft = slow
        app(["adapter", "convert", {str(adapter)!r}, {str(tmp_path / "out")!r}, "--to", "peft"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Interrupted" in proc.stderr and "Traceback" not in proc.stderr
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_fuse_destinations(demo_kit: DemoKit, adapter: Path, tmp_path: Path) -> None:
    model = shutil.copytree(demo_kit.model, tmp_path / "model")
    before = _digest(model), _digest(adapter)

    def fuse(out: Path):  # type: ignore[no-untyped-def]
        return run_cli("adapter", "fuse", "--model", str(model), "--adapter", str(adapter), "--out", str(out))

    _clean_error(fuse(model), 2, "is the base model itself")
    _clean_error(fuse(adapter), 2, "is the adapter itself")
    _clean_error(fuse(model / "fused"), 2, "inside the base model")
    assert (_digest(model), _digest(adapter)) == before
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "fused"
    link.symlink_to(target)
    with _umask(0o022):
        result = fuse(link)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert not (target / ".converted-adapter").exists()
    assert _leftovers(tmp_path) == []


def test_demo_kit_build_honours_umask_and_clears_stale_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kit's folder handling, with its (slow, tested elsewhere) training swapped for a stub."""
    from mlxman.demo import kit

    monkeypatch.setattr(kit, "_build", lambda k, say: (k.root / "text-model").mkdir())
    monkeypatch.setattr(kit, "_record_final_paths", lambda k, root: None)
    parent = kit.kit_root(tmp_path).parent
    parent.mkdir(parents=True)
    (parent / ".building-abc123").mkdir()
    with _umask(0o022):
        built = kit.ensure_demo_kit(tmp_path)
    assert stat.S_IMODE(built.root.stat().st_mode) == 0o755
    assert sorted(p.name for p in parent.iterdir()) == [built.root.name]
    # A rebuild replaces it whole, through a symlinked kit folder too.
    moved = shutil.move(str(built.root), str(tmp_path / "elsewhere"))
    built.root.symlink_to(moved)
    assert kit.ensure_demo_kit(tmp_path, force=True).root == built.root
    assert (Path(moved) / "MANIFEST.json").is_file() and built.root.is_symlink()


def test_a_held_lock_blocks_cleanup_in_process(tmp_path: Path) -> None:
    """flock is per open file: a lock held through another descriptor of this process also counts."""
    (tmp_path / ".converting-x").mkdir()
    fd = os.open(tmp_path / ".converting-x.lock", os.O_CREAT | os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_stale(tmp_path, ".converting-") == []
    finally:
        os.close(fd)
    assert remove_stale(tmp_path, ".converting-") == [tmp_path / ".converting-x"]
