"""``mlxman pull`` and ``mlxman rm`` through the real huggingface_hub client, against a local Hub.

The Hub here is tests/hub_server.py, a real HTTP server in the test process that the CLI (a child process,
because huggingface_hub reads HF_ENDPOINT when it is imported) reaches through HF_ENDPOINT. It speaks what
huggingface_hub's downloads call: model info with file sizes, HEAD and GET on ``/resolve`` with the Hub's
headers, LFS weights behind a redirect to a "CDN" host with Range support, and the Hub's error codes for a
missing repo or revision, a gated repo (401 and 403) and a bare 403. It can drop a connection partway
through a file once, stall a file until released, or serve a file shorter than announced. It does not
emulate tokens, Xet storage, pagination, rate limits or compression: a pull here always takes
huggingface_hub's plain HTTP path. A full disk is emulated by the one reading from outside the machine's
control (the free space, in process); a file system's size limit by RLIMIT_FSIZE on the child.

The repos are built from the demo kit: its tiny llama, embeddings and vision models, one of its adapters
(recording the model's repo id as its base), a PyTorch-only repo, gated copies of the model, a repo with a
broken safetensors header, and a model with a shard larger than huggingface_hub's 10 MiB download chunk (a
resume inside a file starts at a chunk boundary).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from tests.hub_server import HubRepo, LocalHub, local_hub

MODEL = "org/tiny-llama"
ADAPTER = "org/tiny-adapter"
TORCH = "org/torch-only"
GATED = "org/gated-llama"
GATED_403 = "org/gated-for-this-token"
FORBIDDEN = "org/forbidden"
BIG = "org/big-shard"
EMBEDDER = "org/tiny-embedder"
VISION = "org/tiny-vision"
BROKEN = "org/broken-weights"
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
# Files a Hub repo often carries that no MLX loader opens: pull must leave them on the Hub.
NOT_FETCHED = {"README.md": b"# tiny llama\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
CHUNK = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE
BIG_BYTES = CHUNK + 2 * 1024 * 1024


def _safetensors(n_bytes: int) -> bytes:
    header = json.dumps(
        {"filler": {"dtype": "U8", "shape": [n_bytes], "data_offsets": [0, n_bytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    return (
        struct.pack("<Q", len(header))
        + header
        + bytes(range(256)) * (n_bytes // 256)
        + b"\0" * (n_bytes % 256)
    )


@pytest.fixture(scope="module")
def repos(demo_kit: DemoKit) -> list[HubRepo]:
    model = HubRepo.from_folder(MODEL, demo_kit.model, {**NOT_FETCHED, "pytorch_model.bin": b"\x80" * 64})
    adapter_dir = demo_kit.adapters["animals"]
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config.update(model=MODEL, adapter_path="adapters", data="data")
    adapter = HubRepo(
        ADAPTER,
        {
            "adapter_config.json": json.dumps(adapter_config).encode(),
            "adapters.safetensors": (adapter_dir / "adapters.safetensors").read_bytes(),
            **NOT_FETCHED,
        },
    )
    config = (demo_kit.model / "config.json").read_bytes()
    torch = HubRepo(TORCH, {"config.json": config, "pytorch_model.bin": b"\x80" * 4096, **NOT_FETCHED})
    gated = HubRepo(GATED, dict(model.files), gated=True)
    gated_403 = HubRepo(GATED_403, dict(model.files), gated=True, gated_status=403)
    forbidden = HubRepo(FORBIDDEN, dict(model.files), forbidden=True)
    big = HubRepo(BIG, {"config.json": config, "model.safetensors": _safetensors(BIG_BYTES)})
    embedder = HubRepo.from_folder(EMBEDDER, demo_kit.embeddings_model, NOT_FETCHED)
    vision = HubRepo.from_folder(VISION, demo_kit.vision_model, NOT_FETCHED)
    broken = HubRepo(BROKEN, {"config.json": config, "model.safetensors": struct.pack("<Q", 10**6) + b"{}"})
    return [model, adapter, torch, gated, gated_403, forbidden, big, embedder, vision, broken]


@pytest.fixture
def hub(repos: list[HubRepo]) -> Iterator[LocalHub]:
    with local_hub(repos) as server:
        yield server


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / "hf"


def _env(hub: LocalHub, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        MLXMAN_HOST="127.0.0.1:9",  # no mlxman server there: rm asks none unless a test starts one
    )
    env.update(extra)
    return env


def mlxman(
    hub: LocalHub, hf_home: Path, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlxman", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=_env(hub, hf_home, **env),
        timeout=300,
    )


def repo_folder(hf_home: Path, repo_id: str) -> Path:
    return hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))


def snapshot(hf_home: Path, repo: HubRepo) -> Path:
    return repo_folder(hf_home, repo.repo_id) / "snapshots" / repo.sha


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "\nError: " in "\n" + proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def file_gets(hub: LocalHub) -> list[str]:
    return [r.path for r in hub.requests if r.method == "GET" and not r.path.startswith("/api/")]


def by_id(repos: list[HubRepo], repo_id: str) -> HubRepo:
    return next(r for r in repos if r.repo_id == repo_id)


def test_pull_fetches_only_what_mlx_loads_checks_it_and_generate_finds_it(
    hub: LocalHub, hf_home: Path, repos: list[HubRepo]
) -> None:
    proc = mlxman(hub, hf_home, "pull", MODEL)
    assert proc.returncode == 0, proc.stderr
    folder = snapshot(hf_home, by_id(repos, MODEL))
    assert proc.stdout.strip() == str(folder)
    assert f"Pulled {MODEL}: llama, F32" in proc.stderr and "checked" in proc.stderr
    assert "Skipping 3 files MLX does not load" in proc.stderr
    assert {p.name for p in folder.iterdir()} == MODEL_FILES
    for name in MODEL_FILES:
        assert (folder / name).read_bytes() == by_id(repos, MODEL).files[name]
    for name in [*NOT_FETCHED, "pytorch_model.bin"]:
        assert not hub.downloads(name), f"{name} was fetched"
    assert (repo_folder(hf_home, MODEL) / "refs" / "main").read_text() == by_id(repos, MODEL).sha
    assert f"mlxman generate -m {MODEL}" in proc.stderr
    # What was pulled is what the rest of mlxman lists and finds by id, offline.
    listed = mlxman(hub, hf_home, "ls", HF_HUB_OFFLINE="1")
    assert listed.returncode == 0 and MODEL in listed.stdout, listed.stderr
    gen = mlxman(hub, hf_home, "generate", "-m", MODEL, "-p", "hi", "--max-tokens", "2", HF_HUB_OFFLINE="1")
    assert gen.returncode == 0, gen.stderr


def test_pull_again_fetches_nothing_and_json_says_so(
    hub: LocalHub, hf_home: Path, repos: list[HubRepo]
) -> None:
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    fetched = len(file_gets(hub))
    proc = mlxman(hub, hf_home, "pull", MODEL, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["id"] == MODEL and result["kind"] == "model"
    assert result["commit"] == by_id(repos, MODEL).sha
    assert result["downloaded_bytes"] == 0
    assert sorted(result["files"]) == sorted(MODEL_FILES)
    assert result["details"]["model_type"] == "llama" and result["details"]["tensors"] > 0
    assert result["path"] == str(snapshot(hf_home, by_id(repos, MODEL)))
    again = len(file_gets(hub))
    assert again == fetched, "a second pull fetched files again"


def test_a_dropped_connection_resumes_inside_the_file(
    hub: LocalHub, hf_home: Path, repos: list[HubRepo]
) -> None:
    hub.drop_once["model.safetensors"] = CHUNK + 512 * 1024  # one full chunk reaches the disk first
    proc = mlxman(hub, hf_home, "pull", BIG)
    assert proc.returncode == 0, proc.stderr
    gets = hub.downloads("model.safetensors")
    assert [g.range for g in gets] == [None, f"bytes={CHUNK}-"]
    data = (snapshot(hf_home, by_id(repos, BIG)) / "model.safetensors").read_bytes()
    assert (
        hashlib.sha256(data).digest() == hashlib.sha256(by_id(repos, BIG).files["model.safetensors"]).digest()
    )
    assert "Traceback" not in proc.stderr and "resume" not in proc.stderr.lower()


def test_an_interrupted_pull_keeps_finished_files_and_the_next_fetches_the_rest(
    hub: LocalHub, hf_home: Path, repos: list[HubRepo]
) -> None:
    hub.stall.add("model.safetensors")  # the largest file, so the last: the others are done by then
    child = subprocess.Popen(
        [sys.executable, "-m", "mlxman", "pull", MODEL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(hub, hf_home),
    )
    try:
        assert hub.stalled.wait(120), "the pull never reached the weights"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"Interrupted; 4 of 5 files of {MODEL} are in the cache" in stderr
    assert f"run `mlxman pull {MODEL}` again" in stderr
    folder = repo_folder(hf_home, MODEL)
    assert not list((folder / "blobs").glob("*.incomplete")), "a partial file was left behind"
    assert not (folder / "refs" / "main").exists(), "the branch points at half a model"

    hub.stall.clear()
    hub.release.set()
    first = {r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    hub.requests.clear()
    proc = mlxman(hub, hf_home, "pull", MODEL)
    assert proc.returncode == 0, proc.stderr
    refetched = {r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path}
    assert first and not refetched & first, "finished files were fetched again"
    assert len(hub.downloads("model.safetensors")) == 1
    assert (folder / "refs" / "main").exists()


def test_a_missing_repo_or_revision_is_a_clear_error(hub: LocalHub, hf_home: Path) -> None:
    assert_clean_error(
        mlxman(hub, hf_home, "pull", "org/no-such-model"),
        1,
        "org/no-such-model is not on the Hugging Face Hub",
    )
    assert_clean_error(mlxman(hub, hf_home, "pull", f"{MODEL}@v9"), 1, f"{MODEL} has no revision 'v9'")
    assert not (hf_home / "hub" / "models--org--no-such-model" / "snapshots").exists()


@pytest.mark.parametrize("repo_id", [GATED, GATED_403])
def test_a_gated_repo_says_how_to_get_access(hub: LocalHub, hf_home: Path, repo_id: str) -> None:
    proc = mlxman(hub, hf_home, "pull", repo_id)
    assert_clean_error(proc, 1, f"{repo_id} is gated", "hf auth login", f"https://huggingface.co/{repo_id}")
    assert not [r for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_a_forbidden_repo_says_the_hub_refused(hub: LocalHub, hf_home: Path) -> None:
    proc = mlxman(hub, hf_home, "pull", FORBIDDEN)
    assert_clean_error(proc, 1, f"The Hub refused access to {FORBIDDEN} (HTTP 403)", "hf auth login")


def test_a_pytorch_only_repo_is_refused_before_any_download(hub: LocalHub, hf_home: Path) -> None:
    proc = mlxman(hub, hf_home, "pull", TORCH)
    assert_clean_error(
        proc, 1, "is not in MLX format", "PyTorch pickles (pytorch_model.bin)", "mlx_lm.convert"
    )
    assert all(r.path.startswith("/api/") for r in hub.requests), "files were fetched"


def test_an_adapter_repo_is_validated_against_its_base_when_the_base_is_here(
    hub: LocalHub, hf_home: Path
) -> None:
    alone = mlxman(hub, hf_home, "pull", ADAPTER, "--json")
    assert alone.returncode == 0, alone.stderr
    result = json.loads(alone.stdout)
    assert result["kind"] == "adapter" and result["details"]["format"] == "mlx"
    assert result["details"]["checked_against"] is None
    assert f"its base model {MODEL} is not on this machine" in alone.stderr
    assert f"mlxman pull {MODEL}" in alone.stderr

    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    with_base = mlxman(hub, hf_home, "pull", ADAPTER)
    assert with_base.returncode == 0, with_base.stderr
    assert f"fits {MODEL}" in with_base.stderr
    assert "Warning" not in with_base.stderr  # the base it records is the cached repo it was checked against
    assert f"--adapter {with_base.stdout.strip()}" in with_base.stderr


def test_offline_and_unreachable_hubs_are_clear_errors(hub: LocalHub, hf_home: Path) -> None:
    offline = mlxman(hub, hf_home, "pull", MODEL, HF_HUB_OFFLINE="1")
    assert_clean_error(offline, 1, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
    down = mlxman(hub, hf_home, "pull", MODEL, HF_ENDPOINT="http://127.0.0.1:9")
    assert_clean_error(down, 1, "did not answer", "check the network")


def test_a_malformed_repo_id_is_a_usage_error(hub: LocalHub, hf_home: Path) -> None:
    for bad in ("just-a-name", "a/b/c", "org/name@", "org/-bad", "org/na--me"):
        assert_clean_error(mlxman(hub, hf_home, "pull", bad), 2, "is not a Hugging Face repo id")
    assert not hub.requests


def test_a_full_disk_is_refused_before_the_download(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free space is the one thing read from outside: it is set low here (in process, endpoint passed)."""
    import shutil

    from huggingface_hub import constants

    from mlxman.errors import MlxmanError
    from mlxman.library import hub as library

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        library.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )  # type: ignore[attr-defined]
    with pytest.raises(MlxmanError, match="Not enough disk space to pull org/tiny-llama: it needs"):
        library.pull(library.parse_spec(MODEL), endpoint=hub.url, cache=tmp_path / "cache")
    assert all(r.path.startswith("/api/") for r in hub.requests), "files were fetched"


def test_rm_asks_first_and_keeps_the_model_unless_told_yes(hub: LocalHub, hf_home: Path) -> None:
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    folder = repo_folder(hf_home, MODEL)
    kept = mlxman(hub, hf_home, "rm", MODEL, stdin="n\n")
    assert kept.returncode == 1 and "Traceback" not in kept.stderr
    assert f"Remove {MODEL} [" in kept.stderr and "(main)" in kept.stderr and f"Kept {MODEL}." in kept.stderr
    assert folder.exists()
    gone = mlxman(hub, hf_home, "rm", MODEL, stdin="y\n")
    assert gone.returncode == 0, gone.stderr
    assert f"Removed {MODEL}: freed" in gone.stderr
    assert not folder.exists()


def test_rm_with_no_one_to_answer_is_one_error_line(hub: LocalHub, hf_home: Path) -> None:
    # A script without --yes (stdin closed): an Error line naming --yes, not click's bare "Aborted!".
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    unanswered = mlxman(hub, hf_home, "rm", MODEL, stdin="")
    assert_clean_error(unanswered, 2, "--yes")
    assert "Aborted" not in unanswered.stderr and repo_folder(hf_home, MODEL).exists()


def test_rm_names_the_names_it_leaves_without_a_target(hub: LocalHub, hf_home: Path, tmp_path: Path) -> None:
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    assert mlxman(hub, hf_home, "pull", ADAPTER).returncode == 0
    home = {"MLXMAN_HOME": str(tmp_path / "home")}
    adapter = next((repo_folder(hf_home, ADAPTER) / "snapshots").iterdir())
    assert mlxman(hub, hf_home, "alias", "base", MODEL, **home).returncode == 0
    assert mlxman(hub, hf_home, "alias", "pair", f"{MODEL}::{adapter}", **home).returncode == 0
    gone = mlxman(hub, hf_home, "rm", ADAPTER, "--yes", **home)
    assert gone.returncode == 0, gone.stderr
    assert "pair" in gone.stderr and "base" not in gone.stderr.replace(str(hf_home), "")
    assert "mlxman alias rm pair" in gone.stderr


def test_pull_of_a_name_says_what_it_stands_for(tmp_path: Path, demo_kit: DemoKit) -> None:
    from tests.helpers import run_cli

    assert run_cli("alias", "chat", str(demo_kit.model)).exit_code == 0
    result = run_cli("pull", "chat")
    assert result.exit_code == 2 and result.stderr.startswith("Error: 'chat' is a name for ")
    assert str(demo_kit.model) in result.stderr and "nothing to pull" in result.stderr


def test_rm_yes_json_says_what_was_freed(hub: LocalHub, hf_home: Path, repos: list[HubRepo]) -> None:
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    proc = mlxman(hub, hf_home, "rm", MODEL, "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    size = sum(len(by_id(repos, MODEL).files[n]) for n in MODEL_FILES)
    assert result["freed_bytes"] == size
    assert [r["commit"] for r in result["removed"]["revisions"]] == [by_id(repos, MODEL).sha]
    assert not repo_folder(hf_home, MODEL).exists()
    missing = mlxman(hub, hf_home, "rm", MODEL, "--yes")
    assert_clean_error(missing, 1, f"{MODEL} is not in the Hugging Face cache", "mlxman ls")


def test_rm_is_refused_while_a_running_server_holds_the_model(
    hub: LocalHub, hf_home: Path, tmp_path: Path
) -> None:
    from tests.server_harness import running_server

    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    hf_env = {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "HF_ENDPOINT": hub.url}
    with running_server(tmp_path, env=hf_env) as server:
        loaded = server.post("/api/pool/load", {"model": MODEL})
        assert loaded.status_code == 200, loaded.text
        held = mlxman(hub, hf_home, "rm", MODEL, "--yes", MLXMAN_HOST=server.host)
        assert_clean_error(held, 1, f"holds {MODEL}", "mlxman pool unload")
        assert repo_folder(hf_home, MODEL).exists()
        key = next(iter(server.pool_keys()))
        assert server.post("/api/pool/unload", {"key": key}).status_code == 200
        freed = mlxman(hub, hf_home, "rm", MODEL, "--yes", MLXMAN_HOST=server.host)
        assert freed.returncode == 0, freed.stderr
    assert not repo_folder(hf_home, MODEL).exists()


def test_pull_and_rm_leave_huggingface_hub_out_of_cli_start_up() -> None:
    code = (
        "import sys\n"
        "from mlxman.cli.app import app\n"
        "for args in (['--help'], ['pull', '--help'], ['rm', '--help']):\n"
        "    try:\n        app(args, prog_name='mlxman')\n    except SystemExit:\n        pass\n"
        "print('huggingface_hub' in sys.modules, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "False"


def test_a_pulled_model_stays_found_after_mlx_lm_fetches_it_by_pattern(
    hub: LocalHub, hf_home: Path, demo_kit: DemoKit
) -> None:
    """mlx-lm's own download (snapshot_download with its file patterns) caches the repo's full file list;
    huggingface_hub then calls the snapshot incomplete offline (README.md is missing), which mlxman must not
    take for "not in the cache"."""
    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    code = (
        "from huggingface_hub import snapshot_download\n"
        f"snapshot_download({MODEL!r}, allow_patterns=['*.json', 'model*.safetensors'])\n"
    )
    fetched = subprocess.run(
        [sys.executable, "-c", code], env=_env(hub, hf_home), capture_output=True, text=True
    )
    assert fetched.returncode == 0, fetched.stderr
    adapter = str(demo_kit.adapters["animals"])
    proc = mlxman(hub, hf_home, "adapter", "validate", adapter, "-m", MODEL, HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stderr


def test_rm_of_a_name_says_which_rm_is_meant(hub: LocalHub, hf_home: Path, demo_kit: DemoKit) -> None:
    assert mlxman(hub, hf_home, "alias", "chat", str(demo_kit.model)).returncode == 0
    proc = mlxman(hub, hf_home, "rm", "chat", "--yes")
    assert_clean_error(proc, 2, "'chat' is a name for", "mlxman alias rm chat")


def test_holders_match_ids_and_paths_of_the_removed_revisions_only(tmp_path: Path) -> None:
    from mlxman.library.hub import CachedRevision, Removal, holders

    repo = tmp_path / "models--org--m"
    old, new = "a" * 40, "b" * 40
    removal = Removal(
        repo_id="org/m",
        repo_path=repo,
        revisions=[CachedRevision(old, [], 10, repo / "snapshots" / old)],
        freed_bytes=10,
        whole_repo=False,
    )
    pool = {
        "entries": [
            {"key": f"org/m@{old}"},
            {"key": f"org/m@{new}"},  # the revision that stays
            {"key": f"org/m-2@{old}"},  # another repo sharing the prefix
            {"key": f"/base::{repo}/snapshots/{old}"},  # an adapter inside the removed snapshot
            {"key": f"{repo}/snapshots/{new}"},
            {"key": "/elsewhere", "parent": f"org/m@{old}"},
        ]
    }
    assert holders(removal, pool) == [f"org/m@{old}", f"/base::{repo}/snapshots/{old}", "/elsewhere"]
    whole = Removal(
        "org/m",
        repo,
        [*removal.revisions, CachedRevision(new, ["main"], 1, repo / "snapshots" / new)],
        11,
        True,
    )
    assert len(holders(whole, pool)) == 5
    assert holders(whole, {"entries": [{"key": "org/m@main"}, {"key": "org/m"}]}) == ["org/m@main", "org/m"]


@pytest.mark.parametrize(
    ("text", "repo_id", "revision"),
    [
        ("org/name", "org/name", None),
        ("org/name@v1.0", "org/name", "v1.0"),
        (" a.b/c_d-1@refs/pr/3 ", "a.b/c_d-1", "refs/pr/3"),
    ],
)
def test_repo_specs(text: str, repo_id: str, revision: str | None) -> None:
    from mlxman.library.hub import parse_spec

    spec = parse_spec(text)
    assert (spec.repo_id, spec.revision) == (repo_id, revision)


def test_rm_of_one_revision_keeps_the_blobs_another_revision_shares(
    repos: list[HubRepo], hf_home: Path
) -> None:
    repo = HubRepo(MODEL, dict(by_id(repos, MODEL).files))
    with local_hub([repo]) as server:
        assert mlxman(server, hf_home, "pull", MODEL).returncode == 0
        old = repo.sha
        config = json.loads(repo.files["config.json"])
        for note in range(1000):  # a new commit whose hash starts as the old one's, for an ambiguous prefix
            repo.files["config.json"] = json.dumps({**config, "note": note}).encode()
            if repo.sha[0] == old[0] and repo.sha != old:
                break
        assert mlxman(server, hf_home, "pull", MODEL).returncode == 0
        ambiguous = mlxman(server, hf_home, "rm", f"{MODEL}@{old[0]}", "--yes")
        assert_clean_error(
            ambiguous, 2, f"'{old[0]}' is the start of 2 cached commits", "more of the commit hash"
        )
        proc = mlxman(server, hf_home, "rm", f"{MODEL}@{old[:10]}", "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["commit"] for r in result["removed"]["revisions"]] == [old]
    assert result["freed_bytes"] == len(by_id(repos, MODEL).files["config.json"])  # the rest is shared
    folder = repo_folder(hf_home, MODEL)
    assert not (folder / "snapshots" / old).exists()
    assert (folder / "snapshots" / repo.sha / "model.safetensors").read_bytes() == repo.files[
        "model.safetensors"
    ]


def _small_file_limit() -> None:
    """In the child: files may not grow past 4 MiB (as on a file system with a small file size limit)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024 * 1024, 4 * 1024 * 1024))


def test_a_file_the_disk_cannot_hold_is_a_clear_error(hub: LocalHub, hf_home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlxman", "pull", BIG],
        capture_output=True,
        text=True,
        env=_env(hub, hf_home),
        preexec_fn=_small_file_limit,
        timeout=300,
    )
    assert_clean_error(proc, 1, "cannot hold model.safetensors of org/big-shard", "not FAT32")
    folder = repo_folder(hf_home, BIG)
    assert not list((folder / "blobs").glob("*.incomplete")), "a partial file was left behind"
    assert (folder / "snapshots").exists() and not (folder / "refs" / "main").exists()


@pytest.mark.parametrize("repo_id", [EMBEDDER, VISION])
def test_embeddings_and_vision_repos_come_whole_subfolders_included(
    hub: LocalHub, hf_home: Path, repos: list[HubRepo], repo_id: str
) -> None:
    proc = mlxman(hub, hf_home, "pull", repo_id, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    repo = by_id(repos, repo_id)
    wanted = sorted(set(repo.files) - set(NOT_FETCHED))
    assert sorted(result["files"]) == wanted
    assert result["path"] == str(snapshot(hf_home, repo))
    for name in wanted:  # 1_Pooling/config.json for sentence-transformers
        assert (snapshot(hf_home, repo) / name).read_bytes() == repo.files[name]
    listed = mlxman(hub, hf_home, "ls", "--json", HF_HUB_OFFLINE="1")
    assert listed.returncode == 0 and repo_id in listed.stdout, listed.stderr


def test_rm_will_not_guess_when_the_server_wants_a_key(hub: LocalHub, hf_home: Path, tmp_path: Path) -> None:
    from tests.server_harness import running_server

    assert mlxman(hub, hf_home, "pull", MODEL).returncode == 0
    with running_server(tmp_path, api_key="s3cret-key") as server:
        blind = mlxman(hub, hf_home, "rm", MODEL, "--yes", MLXMAN_HOST=server.host)
        assert_clean_error(blind, 1, "needs an API key, so it cannot say whether it holds", "MLXMAN_API_KEY")
        assert repo_folder(hf_home, MODEL).exists()
        keyed = mlxman(
            hub, hf_home, "rm", MODEL, "--yes", MLXMAN_HOST=server.host, MLXMAN_API_KEY="s3cret-key"
        )
        assert keyed.returncode == 0, keyed.stderr
    assert not repo_folder(hf_home, MODEL).exists()


def test_a_file_shorter_than_announced_is_a_clear_error(hub: LocalHub, hf_home: Path) -> None:
    hub.short.add("model.safetensors")
    proc = mlxman(hub, hf_home, "pull", MODEL)
    assert_clean_error(proc, 1, f"The download of model.safetensors of {MODEL} went wrong", "pull again")
    folder = repo_folder(hf_home, MODEL)
    assert not list((folder / "blobs").glob("*.incomplete")) and not (folder / "refs" / "main").exists()


def test_a_repo_whose_files_do_not_check_out_is_not_recorded(hub: LocalHub, hf_home: Path) -> None:
    proc = mlxman(hub, hf_home, "pull", BROKEN)
    assert_clean_error(
        proc, 1, f"{BROKEN} was fetched but does not check out", "model.safetensors", f"mlxman rm {BROKEN}"
    )
    assert not (repo_folder(hf_home, BROKEN) / "refs" / "main").exists()
    assert mlxman(hub, hf_home, "rm", BROKEN, "--yes").returncode == 0


def test_pull_and_rm_load_nothing_heavy(hub: LocalHub, hf_home: Path) -> None:
    """The check before done reads JSON and headers: no mlx-lm, transformers or even MLX is imported."""
    code = (
        "import sys\n"
        "from mlxman.cli.app import app\n"
        f"for args in (['pull', {MODEL!r}], ['pull', {ADAPTER!r}], ['rm', {ADAPTER!r}, '--yes']):\n"
        "    try:\n        app(args, prog_name='mlxman')\n    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "heavy = ('mlx_lm', 'mlx_vlm', 'mlx_embeddings', 'transformers', 'mlx.core')\n"
        "print([m for m in heavy if m in sys.modules], file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(hub, hf_home)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "[]"
