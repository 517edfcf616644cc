"""``mlxman alias``: names for models and model+adapter pairs, and names wherever a model id is taken."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from mlxman.errors import ConfigError, NotFoundError, UsageError
from mlxman.library import aliases
from mlxman.library.aliases import (
    aliases_path,
    check_name,
    load_aliases,
    lookup,
    names_by_key,
    remove_alias,
    set_alias,
)
from mlxman.pool.keys import resolve_target
from tests.helpers import imported_heavy_modules, run_cli


def pair(kit: DemoKit, adapter: str = "colors") -> str:
    return f"{kit.model}::{kit.adapters[adapter]}"


# --- names and the file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat", "llama3:8b", "x.y_z-1", "A9", "a" * 64])
def test_good_names(name: str) -> None:
    check_name(name)
    assert aliases.looks_like_name(name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("org/model", "looks like a path"),
        ("./chat", "looks like a path"),
        ("..", "looks like a path"),
        ("~chat", "looks like a path"),
        ("a::b", "'::'"),
        ("a" * 65, "over 64"),
        ("a b", "characters a name cannot have"),
        ("chat:", "characters a name cannot have"),
        ("a:b:c", "characters a name cannot have"),
        ("-x", "characters a name cannot have"),
        ("café", "characters a name cannot have"),
        # The words of `mlxman alias` itself: `mlxman alias ls MODEL` could not name anything.
        ("ls", "a command of `mlxman alias`"),
        ("rm", "a command of `mlxman alias`"),
        ("set", "a command of `mlxman alias`"),
    ],
)
def test_bad_names_say_why(name: str, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        check_name(name)
    assert not aliases.looks_like_name(name) or name in aliases.RESERVED_NAMES


def test_targets_are_stored_absolute_and_the_file_is_written_whole(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(demo_kit.model.parent)
    alias, previous = set_alias("chat", f"./{demo_kit.model.name}::adapters/colors")
    assert previous is None
    assert alias.model == str(demo_kit.model.resolve())
    assert alias.adapter == str(demo_kit.adapters["colors"].resolve())
    doc = json.loads(aliases_path().read_text())
    assert doc["version"] == 1 and doc["aliases"]["chat"]["adapter"] == alias.adapter
    # Replacing says what was there; no temporary file is left beside it.
    again, previous = set_alias("chat", str(demo_kit.model))
    assert previous is not None and previous.adapter == alias.adapter and again.adapter is None
    assert sorted(p.name for p in aliases_path().parent.iterdir() if not p.name.endswith(".lock")) == [
        "aliases.json"
    ]


def test_a_name_given_as_target_is_copied(demo_kit: DemoKit) -> None:
    set_alias("chat", pair(demo_kit))
    copy, _ = set_alias("chat2", "chat")
    assert copy.target == lookup("chat").target  # type: ignore[union-attr]
    remove_alias("chat")
    assert resolve_target("chat2").key == resolve_target(pair(demo_kit)).key


def test_a_missing_target_is_refused_and_nothing_is_written(demo_kit: DemoKit, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        set_alias("chat", str(tmp_path / "nothing"))
    with pytest.raises(NotFoundError):
        set_alias("chat", f"{demo_kit.model}::{tmp_path / 'no-adapter'}")
    assert load_aliases() == {}


def test_changes_are_seen_at_once_by_a_reader_holding_the_cache(demo_kit: DemoKit) -> None:
    set_alias("chat", pair(demo_kit, "colors"))
    assert lookup("chat").adapter == str(demo_kit.adapters["colors"])  # type: ignore[union-attr]
    set_alias("chat", pair(demo_kit, "numbers"))  # the same size of file, often within one mtime tick
    assert lookup("chat").adapter == str(demo_kit.adapters["numbers"])  # type: ignore[union-attr]
    remove_alias("chat")
    assert lookup("chat") is None


def test_concurrent_writers_lose_no_name(demo_kit: DemoKit) -> None:
    errors: list[BaseException] = []

    def name(i: int) -> None:
        try:
            set_alias(f"n{i}", str(demo_kit.model))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=name, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(load_aliases()) == sorted(f"n{i}" for i in range(8))


def test_readers_never_see_a_half_written_file(demo_kit: DemoKit) -> None:
    """A server reads names while `alias` rewrites the file: each read is the old file or the new one."""
    set_alias("chat", pair(demo_kit, "colors"))
    targets = {pair(demo_kit, name) for name in ("colors", "numbers")}
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                alias = lookup("chat")
                assert alias is not None
                seen.append(alias.target)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            set_alias("chat", pair(demo_kit, ("numbers", "colors")[i % 2]))
            set_alias(f"other{i}", str(demo_kit.model))  # the file grows and shrinks in size too
            remove_alias(f"other{i}")
    finally:
        stop.set()
        reader.join()
    assert errors == [] and seen and set(seen) <= targets


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"version": 2, "aliases": {}}',
        '{"version": 1, "aliases": {"chat": {"model": "relative-folder"}}}',
        '{"version": 1, "aliases": {"a/b": {"model": "/abs/model"}}}',
        '{"version": 1, "aliases": {"chat": {"model": "/abs/model", "adapter": "rel"}}}',
    ],
)
def test_a_broken_file_is_a_clear_config_error(content: str, demo_kit: DemoKit) -> None:
    aliases_path().write_text(content)
    with pytest.raises(ConfigError, match="names file"):
        lookup("chat")
    # Specs that cannot be names never read the file: paths and Hugging Face ids still work.
    assert resolve_target(pair(demo_kit)).adapter == demo_kit.adapters["colors"].resolve()
    result = run_cli("alias", "ls")
    assert result.exit_code == 2 and "Error: " in result.stderr and "names file" in result.stderr


def test_names_by_key_match_pool_keys_without_touching_the_disk() -> None:
    found = {
        "chat": aliases.Alias("chat", "/m/base", "/a/colors"),
        "base": aliases.Alias("base", "/m/base"),
        "hub": aliases.Alias("hub", "org/model"),
        "pinned": aliases.Alias("pinned", "org/model@abc"),
    }
    keys = [
        "/m/base",
        "/m/base::/a/colors",
        "/m/base::/a/other",
        "org/model@abc",
        "org/model@def",
        "/m/base2",
    ]
    assert names_by_key(keys, found) == {
        "/m/base": ["base"],
        "/m/base::/a/colors": ["chat"],
        "/m/base::/a/other": [],
        "org/model@abc": ["hub", "pinned"],
        "org/model@def": ["hub"],
        "/m/base2": [],
    }


# --- the CLI -----------------------------------------------------------------------------------------------


def test_alias_set_ls_rm(demo_kit: DemoKit) -> None:
    made = run_cli("alias", "chat", pair(demo_kit))
    assert made.exit_code == 0, made.stderr
    assert "chat stands for" in made.stderr and made.stdout == ""
    assert run_cli("alias", "set", "base", str(demo_kit.model)).exit_code == 0

    listed = run_cli("alias", "ls", "--json")
    assert listed.exit_code == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["chat"]["adapter"] == str(demo_kit.adapters["colors"]) and rows["chat"]["ok"] is True
    assert rows["base"]["adapter"] is None and rows["base"]["model"] == str(demo_kit.model)
    table = run_cli("alias", "ls")
    assert table.exit_code == 0 and "chat" in table.stdout and "NAME" in table.stdout

    removed = run_cli("alias", "rm", "chat", "base")
    assert removed.exit_code == 0, removed.stderr
    assert load_aliases() == {}
    missing = run_cli("alias", "rm", "chat")
    assert missing.exit_code == 1 and "Error: No name 'chat'" in missing.stderr
    empty = run_cli("alias", "ls")
    assert empty.exit_code == 0 and "No names yet" in empty.stderr


def test_bad_input_is_one_error_line(demo_kit: DemoKit, tmp_path: Path) -> None:
    for args, code in [
        (["alias", "a/b", str(demo_kit.model)], 2),
        (["alias", "chat", str(tmp_path / "gone")], 1),
        (["alias", "chat", f"{demo_kit.model}::"], 2),
    ]:
        result = run_cli(*args)
        assert result.exit_code == code, (args, result.stderr)
        assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr, args


def test_a_name_whose_target_is_gone_says_so_and_names_the_alias(demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = tmp_path / "colors"
    shutil.copytree(demo_kit.adapters["colors"], adapter)
    assert run_cli("alias", "chat", f"{demo_kit.model}::{adapter}").exit_code == 0
    shutil.rmtree(adapter)
    result = run_cli("generate", "-m", "chat", "-p", "hi", "--max-tokens", "2")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Name 'chat'") and "does not exist" in result.stderr
    assert "mlxman alias rm chat" in result.stderr
    listed = json.loads(run_cli("alias", "ls", "--json").stdout)
    assert listed[0]["ok"] is False and "does not exist" in listed[0]["problem"]


def test_a_name_wins_over_a_folder_of_that_name_here(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_kit.embeddings_model, tmp_path / "chat")
    made = run_cli("alias", "chat", str(demo_kit.model))
    assert made.exit_code == 0 and "./chat" in made.stderr
    assert resolve_target("chat").model.path == demo_kit.model.resolve()
    assert resolve_target("./chat").model.path == (tmp_path / "chat").resolve()


# --- names wherever a model id is taken --------------------------------------------------------------------


def test_generate_by_name_is_generate_by_model_and_adapter(demo_kit: DemoKit) -> None:
    assert run_cli("alias", "chat", pair(demo_kit, "numbers")).exit_code == 0
    by_name = run_cli("generate", "-m", "chat", "-p", DEMO_PROMPT, "--json")
    assert by_name.exit_code == 0, by_name.stderr
    (answer,) = json.loads(by_name.stdout)
    assert answer["key"] == resolve_target(pair(demo_kit, "numbers")).key
    assert answer["text"].startswith(demo_kit.answers["numbers"])
    # A name for a base takes --adapter; a name for a pair refuses a second adapter.
    assert run_cli("alias", "base", str(demo_kit.model)).exit_code == 0
    colors = run_cli("generate", "-m", "base", "-a", str(demo_kit.adapters["colors"]), "-p", DEMO_PROMPT)
    assert colors.exit_code == 0 and colors.stdout.startswith(demo_kit.answers["colors"])
    assert "colors:" in colors.stderr
    twice = run_cli("generate", "-m", "chat", "-a", str(demo_kit.adapters["colors"]), "-p", "hi")
    assert twice.exit_code == 1 and "Error: Name 'chat' already stands for" in twice.stderr


def test_embed_and_estimate_by_name(demo_kit: DemoKit) -> None:
    assert run_cli("alias", "emb", str(demo_kit.embeddings_model)).exit_code == 0
    embedded = run_cli("embed", "-m", "emb", "--json", "hello")
    assert embedded.exit_code == 0, embedded.stderr
    assert json.loads(embedded.stdout)["model"] == str(demo_kit.embeddings_model.resolve())
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    estimate = run_cli("pool", "estimate", "chat", "--memory-limit", "4GB", "--json")
    assert estimate.exit_code == 0, estimate.stderr
    assert json.loads(estimate.stdout)["key"] == resolve_target(pair(demo_kit)).key


def test_adapter_validate_takes_a_model_name_and_refuses_a_pair_name(demo_kit: DemoKit) -> None:
    assert run_cli("alias", "base", str(demo_kit.model)).exit_code == 0
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    ok = run_cli("adapter", "validate", str(demo_kit.adapters["numbers"]), "--model", "base", "--json")
    assert ok.exit_code == 0, ok.stderr
    refused = run_cli("adapter", "validate", str(demo_kit.adapters["numbers"]), "--model", "chat")
    assert refused.exit_code == 2
    assert "Error: Name 'chat' stands for a model with an adapter" in refused.stderr
    assert str(demo_kit.model) in refused.stderr  # the next step names the base to pass instead


def test_alias_commands_import_nothing_heavy(demo_kit: DemoKit) -> None:
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    assert imported_heavy_modules("alias", "ls") == []
    assert imported_heavy_modules("alias", "base", str(demo_kit.model)) == []


def test_a_name_for_a_cached_hub_id(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    from mlxman.server.security import AccessDenied, PathPolicy

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    revision = "c" * 40
    repo = hub / "models--org--tiny"
    shutil.copytree(demo_kit.model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    alias, _ = set_alias("tiny", "org/tiny")
    assert alias.model == "org/tiny"  # kept as an id: the name follows the cache's main revision
    key = f"org/tiny@{revision}"
    assert resolve_target("tiny").key == key
    assert names_by_key([key]) == {key: ["tiny"]}
    answer = run_cli("generate", "-m", "tiny", "-p", DEMO_PROMPT, "--max-tokens", "4")
    assert answer.exit_code == 0, answer.stderr

    # On a server: loaded, it is served by its key; else only when its snapshot lies under a root.
    assert PathPolicy().resolve("tiny", {key}).key == key
    with pytest.raises(AccessDenied):
        PathPolicy().resolve("tiny", set())
    # A root at the cache's hub folder serves cached models by their ids (and names for them).
    assert PathPolicy([hub]).resolve("tiny", set()).key == key
    assert PathPolicy([hub]).resolve("org/tiny", set()).key == key
    (tmp_path / "elsewhere").mkdir()
    elsewhere = PathPolicy([tmp_path / "elsewhere"])
    with pytest.raises(NotFoundError, match="'tiny'"):
        elsewhere.resolve("tiny", set())
    # A cached model outside the roots gets the answer a missing one gets.
    answers = []
    for spec in ("org/tiny", "org/nothing"):
        with pytest.raises(NotFoundError) as refused:
            elsewhere.resolve(spec, set())
        answers.append(str(refused.value).replace(spec, "ID"))
    assert answers[0] == answers[1]


def test_adapter_none_on_a_pair_name_is_its_base(demo_kit: DemoKit) -> None:
    # `-a none` asks for the bare base: on a name for a pair it drops the name's adapter; no -a keeps it.
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    bare = run_cli("generate", "-m", "chat", "-a", "none", "-p", DEMO_PROMPT, "--json")
    assert bare.exit_code == 0, bare.stderr
    (answer,) = json.loads(bare.stdout)
    assert answer["key"] == resolve_target(str(demo_kit.model)).key
    both = run_cli(
        "generate",
        "-m",
        "chat",
        "-a",
        "none",
        "-a",
        str(demo_kit.adapters["colors"]),
        "-p",
        "hi",
        "--max-tokens",
        "2",
        "--json",
    )
    assert both.exit_code == 0, both.stderr
    assert [a["key"] for a in json.loads(both.stdout)] == [
        resolve_target(str(demo_kit.model)).key,
        resolve_target(pair(demo_kit)).key,
    ]


def test_a_pair_name_takes_its_own_adapter_however_it_is_spelled(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    monkeypatch.chdir(demo_kit.adapters["colors"].parent)
    assert resolve_target("chat", "./colors").key == resolve_target(pair(demo_kit)).key
    assert resolve_target("chat::colors").key == resolve_target(pair(demo_kit)).key
    with pytest.raises(Exception, match="already stands for"):
        resolve_target("chat", "./numbers")


def test_names_for_cached_ids_are_checked_without_the_hub_client(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `alias ls` checks a name for a cached id by the cache's layout: huggingface_hub's download client
    # (its HTTP stack, a third of a second) stays out of start-up.
    import subprocess
    import sys

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    revision = "d" * 40
    repo = hub / "models--org--tiny"
    shutil.copytree(demo_kit.model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    (repo / "refs" / "v1").write_text(revision)
    set_alias("tiny", "org/tiny")
    set_alias("tiny1", "org/tiny@v1")
    set_alias("gone", "org/tiny")
    doc = json.loads(aliases_path().read_text())
    doc["aliases"]["gone"]["model"] = "org/removed"  # a name whose repo `rm` removed since
    aliases_path().write_text(json.dumps(doc))
    code = (
        "import sys\nfrom mlxman.cli.app import app\n"
        "try:\n    app(['alias', 'ls', '--json'], prog_name='mlxman')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith(('huggingface_hub.file_download', 'httpx'))),"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    assert [(row["name"], row["ok"]) for row in json.loads(proc.stdout)] == [
        ("gone", False),
        ("tiny", True),
        ("tiny1", True),
    ]
    assert resolve_target("tiny1").key == f"org/tiny@{revision}"


def test_alias_rm_of_several_names_removes_all_or_none(demo_kit: DemoKit) -> None:
    assert run_cli("alias", "chat", pair(demo_kit)).exit_code == 0
    assert run_cli("alias", "base", str(demo_kit.model)).exit_code == 0
    refused = run_cli("alias", "rm", "chat", "nope", "--json")
    assert refused.exit_code == 1 and "Error: No name 'nope'" in refused.stderr
    assert sorted(load_aliases()) == ["base", "chat"]  # a typo in the list forgets nothing
    removed = run_cli("alias", "rm", "chat", "base", "chat", "--json")
    assert removed.exit_code == 0, removed.stderr
    assert [row["name"] for row in json.loads(removed.stdout)] == ["chat", "base"]
    assert load_aliases() == {}
