"""``mlxman ls``: the real demo models in a model folder and in a Hugging Face cache, adapters under their
base, names, broken entries, filters and JSON; nothing loaded and nothing heavy imported."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from mlxman.demo import DemoKit
from mlxman.library.catalog import list_models, scan
from tests.helpers import finishes, imported_heavy_modules, run_cli, run_subprocess

REVISION = "a" * 40
OLD_REVISION = "b" * 40


@pytest.fixture
def models_dir(demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The demo kit's folder (three models, three adapters) as the one model folder; an empty cache."""
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(demo_kit.model.parent))
    empty_cache = tmp_path / "empty-hf-cache"
    empty_cache.mkdir()
    _use_cache(monkeypatch, empty_cache)
    return demo_kit.model.parent


def _use_cache(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    import huggingface_hub.constants

    # The constant is read when huggingface_hub is imported; subprocesses read the variable.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))


def hub_cache_repo(cache: Path, repo: str, source: Path, revision: str, main: bool = True) -> Path:
    """A model folder stored as huggingface_hub stores a download: blobs by hash, a snapshot of links."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        if file.is_file():
            data = file.read_bytes()
            blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(revision)
    return snapshot


def ls_json(*args: str) -> Any:
    result = run_cli("ls", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def by_id(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in data["models"]}


def real_parameter_count(model: Path) -> int:
    import mlx.core as mx

    return sum(int(v.size) for f in model.glob("model*.safetensors") for v in mx.load(str(f)).values())


def test_models_in_a_model_folder(models_dir: Path, demo_kit: DemoKit) -> None:
    models = by_id(ls_json())
    text = models[str(demo_kit.model.resolve())]
    assert text["source"] == "folder" and text["kind"] == "text"
    assert text["architecture"] == "LlamaForCausalLM"
    assert text["parameters"] == real_parameter_count(demo_kit.model)
    assert text["dtype"] == "float32" and text["quantization"] is None
    assert text["size_bytes"] == sum(f.stat().st_size for f in demo_kit.model.iterdir())
    assert text["fits"] is True and text["error"] is None
    assert models[str(demo_kit.embeddings_model.resolve())]["kind"] == "embeddings"
    assert models[str(demo_kit.vision_model.resolve())]["kind"] == "vision"
    # Each adapter under the base its config names, described from its config and header.
    adapters = {a["name"]: a for a in text["adapters"]}
    assert set(adapters) == set(demo_kit.adapters)
    assert adapters["colors"]["format"] == "mlx" and adapters["colors"]["rank"] == 8
    assert adapters["animals"]["fine_tune_type"] == "dora"
    assert all(m["adapters"] == [] for m in models.values() if m is not text)


def test_the_estimate_is_the_pools(models_dir: Path, demo_kit: DemoKit) -> None:
    from mlxman.pool import ModelPool

    pool = ModelPool(10**12, context_tokens=1024)
    estimate = pool.estimate(str(demo_kit.model))
    [entry] = list_models(kind="text", budget_bytes=10**12, context_tokens=1024)
    assert entry.estimate_bytes == estimate.weights_bytes + estimate.kv_bytes
    assert entry.context_tokens == estimate.context_tokens
    # Fits means: within the budget the pool would get.
    [tight] = list_models(kind="text", budget_bytes=estimate.weights_bytes, context_tokens=1024)
    assert tight.fits is False


def test_the_memory_limit_decides_fits(models_dir: Path) -> None:
    data = ls_json("--kind", "text", "--memory-limit", "100KB")
    assert data["budget_bytes"] == 100_000 and data["budget_source"] == "--memory-limit"
    assert [m["fits"] for m in data["models"]] == [False]
    assert ls_json("--kind", "text", "--context-length", "256")["models"][0]["context_tokens"] == 256


def test_models_in_the_hugging_face_cache(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    hub_cache_repo(cache, "org/tiny", demo_kit.model, REVISION)
    hub_cache_repo(cache, "org/tiny", demo_kit.model, OLD_REVISION, main=False)
    hub_cache_repo(cache, "org/embed", demo_kit.embeddings_model, REVISION)
    (cache / "datasets--org--data").mkdir()  # not a model: not listed
    _use_cache(monkeypatch, cache)
    models = by_id(ls_json())
    assert set(models) == {"org/tiny", f"org/tiny@{OLD_REVISION}", "org/embed"}
    tiny = models["org/tiny"]
    assert tiny["source"] == "hf-cache" and tiny["repo_id"] == "org/tiny" and tiny["revision"] == REVISION
    assert tiny["kind"] == "text" and tiny["parameters"] == real_parameter_count(demo_kit.model)
    assert models["org/embed"]["kind"] == "embeddings"
    # The same repos, revisions and sizes as huggingface_hub's own cache scan finds.
    from huggingface_hub import scan_cache_dir

    report = scan_cache_dir(cache)
    theirs = {(r.repo_id, rev.commit_hash, rev.size_on_disk) for r in report.repos for rev in r.revisions}
    ours = {(m["repo_id"], m["revision"], m["size_bytes"]) for m in models.values()}
    assert ours == theirs
    # Every id listed is one --model takes.
    from mlxman.models.resolve import resolve_model

    for model_id, entry in models.items():
        assert str(resolve_model(model_id).path) == entry["path"]


def test_adapters_in_a_model_folder_find_their_cached_base(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    hub_cache_repo(cache, "org/tiny", demo_kit.model, REVISION)
    _use_cache(monkeypatch, cache)
    adapters = tmp_path / "adapters"
    copy = shutil.copytree(demo_kit.adapters["colors"], adapters / "colors-for-tiny")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "model": "org/tiny"}))
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(adapters))
    [tiny] = ls_json()["models"]
    assert tiny["id"] == "org/tiny" and [a["name"] for a in tiny["adapters"]] == ["colors-for-tiny"]


def test_broken_entries_are_listed_with_the_reason(
    models_dir: Path, demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    bad_json = mine / "bad-json"
    bad_json.mkdir(parents=True)
    (bad_json / "config.json").write_text("{not json")
    no_weights = mine / "no-weights"
    no_weights.mkdir()
    shutil.copy(demo_kit.model / "config.json", no_weights / "config.json")
    truncated = shutil.copytree(demo_kit.model, mine / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    bad_adapter = shutil.copytree(demo_kit.adapters["numbers"], mine / "bad-adapter")
    (bad_adapter / "adapters.safetensors").write_bytes(b"\x00" * 4)
    orphan = shutil.copytree(demo_kit.adapters["colors"], mine / "orphan")
    config = json.loads((orphan / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "model": "org/not-here"}))
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", os.pathsep.join([str(mine), str(models_dir)]))

    models = by_id(ls_json())
    assert "is not valid JSON" in models[str(bad_json)]["error"]
    assert "no model*.safetensors" in models[str(no_weights)]["error"]
    assert "truncated" in models[str(truncated)]["error"]
    assert models[str(truncated)]["size_bytes"] > 0
    missing = models["org/not-here"]
    assert missing["source"] == "missing" and [a["name"] for a in missing["adapters"]] == ["orphan"]
    text = models[str(demo_kit.model.resolve())]
    broken = {a["name"]: a for a in text["adapters"]}["bad-adapter"]
    assert broken["error"] and broken["base"] == str(demo_kit.model)
    # The good ones are all still there, described.
    assert text["error"] is None and text["parameters"] == real_parameter_count(demo_kit.model)

    result = run_cli("ls")
    assert result.exit_code == 0
    assert "broken" in result.stdout and "is not valid JSON" in result.stdout
    assert "Adapters whose base is not here" in result.stdout and "org/not-here: orphan" in result.stdout


def test_filters(models_dir: Path, demo_kit: DemoKit) -> None:
    assert [m["kind"] for m in ls_json("--kind", "vision")["models"]] == ["vision"]
    # A substring of the id, or of an adapter's name, picks the model.
    assert [m["kind"] for m in ls_json("EMBEDDINGS")["models"]] == ["embeddings"]
    [text] = ls_json("colors")["models"]
    assert text["id"] == str(demo_kit.model.resolve())
    assert ls_json("nothing-like-this")["models"] == []
    listed = json.loads(run_cli("ls", "--adapters", "--json").stdout)
    assert sorted(a["name"] for a in listed) == sorted(demo_kit.adapters)
    assert {a["base_id"] for a in listed} == {str(demo_kit.model.resolve())}
    result = run_cli("ls", "--kind", "audio")
    assert result.exit_code == 2 and "Unknown model kind 'audio'" in result.stderr


def test_table(models_dir: Path, demo_kit: DemoKit) -> None:
    result = run_cli("ls", env={"COLUMNS": "60"})
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "ARCH", "PARAMS", "DTYPE", "SIZE", "ESTIMATE", "FITS"]
    # Never cut to the terminal: the id is what --model takes.
    assert any(line.startswith(str(demo_kit.model.resolve()) + " ") for line in lines)
    assert any(line.strip().startswith("└ colors") for line in lines)
    assert "pool budget" in result.stderr
    adapters = run_cli("ls", "--adapters").stdout.splitlines()
    assert adapters[0].split()[:2] == ["ADAPTER", "BASE"] and len(adapters) == 1 + len(demo_kit.adapters)


def test_names_are_listed_on_their_model(models_dir: Path, demo_kit: DemoKit) -> None:
    assert run_cli("alias", "tiny", str(demo_kit.model)).exit_code == 0
    pair = f"{demo_kit.model}::{demo_kit.adapters['colors']}"
    assert run_cli("alias", "tiny-colors", pair).exit_code == 0
    data = ls_json()
    assert by_id(data)[str(demo_kit.model.resolve())]["names"] == ["tiny"]
    names = {n["name"]: n for n in data["names"]}
    assert set(names) == {"tiny", "tiny-colors"} and names["tiny-colors"]["error"] is None
    assert names["tiny-colors"]["adapter"] == str(demo_kit.adapters["colors"].resolve())
    result = run_cli("ls")
    assert "(tiny)" in result.stdout and "tiny-colors" in result.stdout


def test_config_model_dirs(
    isolated_home: Path, demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLXMAN_MODEL_DIRS", raising=False)
    _use_cache(monkeypatch, tmp_path / "no-cache-here")
    (isolated_home / "config.toml").write_text(f"model_dirs = [{json.dumps(str(demo_kit.model.parent))}]\n")
    library = scan(budget_bytes=10**12)
    assert library.model_dirs == [str(demo_kit.model.parent)] and "model_dirs in" in library.model_dirs_source
    assert len(library.models) == 3
    (isolated_home / "config.toml").write_text('model_dirs = "not a list"\n')
    result = run_subprocess("ls", env={"MLXMAN_HOME": str(isolated_home)})
    assert result.returncode == 2
    assert "model_dirs in" in result.stderr and "Traceback" not in result.stderr


def test_nothing_found_says_how_to_get_a_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLXMAN_MODEL_DIRS", raising=False)
    _use_cache(monkeypatch, tmp_path / "no-cache-here")
    result = run_cli("ls")
    assert result.exit_code == 0 and result.stdout == ""
    assert "mlxman pull" in result.stderr


def test_ls_imports_nothing_heavy(models_dir: Path) -> None:
    assert imported_heavy_modules("ls") == []
    assert imported_heavy_modules("ls", "--json", "--adapters") == []


def test_an_adapter_repo_in_the_cache_is_listed_under_its_base(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    hub_cache_repo(cache, "org/tiny", demo_kit.model, REVISION)
    source = shutil.copytree(demo_kit.adapters["colors"], tmp_path / "colors")
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "model": "org/tiny"}))
    hub_cache_repo(cache, "org/tiny-colors", source, REVISION)
    # Downloaded at a revision that main does not name: its id carries the revision.
    hub_cache_repo(cache, "org/pinned", demo_kit.model, OLD_REVISION, main=False)
    _use_cache(monkeypatch, cache)
    models = by_id(ls_json())
    assert set(models) == {"org/tiny", f"org/pinned@{OLD_REVISION}"}
    [adapter] = models["org/tiny"]["adapters"]
    assert adapter["name"] == "org/tiny-colors" and adapter["rank"] == 8 and adapter["error"] is None


def test_a_relative_base_is_read_from_the_adapters_folder(
    models_dir: Path, demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    shutil.copytree(demo_kit.model, mine / "base")
    adapter = shutil.copytree(demo_kit.adapters["colors"], mine / "colors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "model": "base"}))
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(mine))
    [base] = ls_json()["models"]
    assert base["id"] == str((mine / "base").resolve())
    assert [a["name"] for a in base["adapters"]] == ["colors"]


def test_a_fifo_in_the_cache_or_a_model_folder_does_not_hang_the_listing(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "hub"
    snapshot = hub_cache_repo(cache, "org/tiny", demo_kit.model, REVISION, main=False)
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    os.mkfifo(refs / "main")
    fifo_model = tmp_path / "mine" / "fifo-model"
    shutil.copytree(demo_kit.model, fifo_model)
    (fifo_model / "config.json").unlink()
    os.mkfifo(fifo_model / "config.json")
    (fifo_model / "adapter_config.json").unlink(missing_ok=True)
    fifo_weights = shutil.copytree(demo_kit.model, tmp_path / "mine" / "fifo-weights")
    (fifo_weights / "model.safetensors").unlink()
    os.mkfifo(fifo_weights / "model.safetensors")
    _use_cache(monkeypatch, cache)
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(tmp_path / "mine"))
    found: list[Any] = []
    assert finishes(lambda: found.append(ls_json())) is None
    models = by_id(found[0])
    # refs/main cannot be read: the id carries the revision.
    assert models[f"org/tiny@{REVISION}"]["error"] is None
    assert "FIFO" in models[str(fifo_weights)]["error"]
    assert str(fifo_model) not in models  # a config.json that is no file: not a model folder


def test_names_with_brackets_are_shown_as_they_are(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Folder names are data, not markup: `[bold]x` is listed as `[bold]x`, and the plain lines after the
    # table carry no escaping backslash.
    _use_cache(monkeypatch, tmp_path / "empty-hub")
    root = tmp_path / "models"
    shutil.copytree(demo_kit.model, root / "m[bold]")
    adapter = shutil.copytree(demo_kit.adapters["colors"], root / "[bold]colors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "model": str(root / "m[bold]")}))
    (root / "[red]broken").mkdir()
    (root / "[red]broken" / "config.json").write_text("{")
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(root))
    table = run_cli("ls")
    assert table.exit_code == 0, table.output
    assert "└ [bold]colors" in table.stdout
    assert f"  {root}/[red]broken: config.json" in table.stdout and "\\[" not in table.stdout
    adapters = run_cli("ls", "--adapters")
    assert adapters.stdout.splitlines()[1].startswith("[bold]colors ")
    assert "\\[" not in run_cli("ls", "--adapters").stderr


def test_a_base_outside_the_model_folders_is_listed_when_it_is_there(
    demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The kit's adapters record the kit's model folder; with only the adapters in model_dirs, that base is
    # on this machine (`-m` takes it), not "missing".
    _use_cache(monkeypatch, tmp_path / "empty-hub")
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", str(demo_kit.adapters["colors"].parent))
    data = ls_json()
    [base] = data["models"]
    assert base["id"] == str(demo_kit.model.resolve()) and base["error"] is None
    assert base["source"] == "folder" and base["kind"] == "text" and base["fits"] is True
    assert sorted(a["name"] for a in base["adapters"]) == sorted(demo_kit.adapters)
    assert "not here" not in run_cli("ls").stdout


def test_the_names_table_is_not_cut_to_the_terminal(models_dir: Path, demo_kit: DemoKit) -> None:
    pair = f"{demo_kit.model}::{demo_kit.adapters['colors']}"
    assert run_cli("alias", "tiny-colors", pair).exit_code == 0
    result = run_cli("ls", env={"COLUMNS": "60"})
    assert result.exit_code == 0
    assert any(line.split()[:2] == ["tiny-colors", pair] for line in result.stdout.splitlines())
    assert "…" not in result.stdout


def test_a_model_folder_that_is_not_one_says_what_it_is(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _use_cache(monkeypatch, tmp_path / "empty-hub")
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    folders = [tmp_path / "gone", tmp_path / "file", tmp_path / "fifo"]
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", ":".join(map(str, folders)))
    problems = scan().problems
    assert problems[0] == f"model folder {tmp_path / 'gone'} is missing"
    assert "is a file" in problems[1] and "FIFO" in problems[2]


def test_a_broken_names_file_is_a_warning_not_a_name(models_dir: Path, isolated_home: Path) -> None:
    # `--json` readers get no made-up name "?": the listing's problems say what is wrong with the file.
    (isolated_home / "aliases.json").write_text("[]")
    data = ls_json()
    assert data["names"] == [] and data["models"]
    assert any("names file" in p and "list" in p for p in data["problems"])
    table = run_cli("ls")
    assert table.exit_code == 0 and "?" not in table.stdout
    assert "Warning: " in table.stderr and "names file" in table.stderr


def test_an_adapter_whose_base_is_a_name_is_listed_under_that_names_model(
    models_dir: Path, demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_cli("alias", "tiny", str(demo_kit.model)).exit_code == 0
    adapters = tmp_path / "adapters"
    copy = shutil.copytree(demo_kit.adapters["colors"], adapters / "colors-by-name")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "model": "tiny"}))
    monkeypatch.setenv("MLXMAN_MODEL_DIRS", f"{models_dir}:{adapters}")
    models = by_id(ls_json())
    assert "tiny" not in models
    assert "colors-by-name" in [a["name"] for a in models[str(demo_kit.model.resolve())]["adapters"]]


def test_kind_keeps_the_names_of_that_kind(models_dir: Path, demo_kit: DemoKit) -> None:
    assert run_cli("alias", "tiny", str(demo_kit.model)).exit_code == 0
    assert run_cli("alias", "tiny-colors", f"{demo_kit.model}::{demo_kit.adapters['colors']}").exit_code == 0
    assert run_cli("alias", "emb", str(demo_kit.embeddings_model)).exit_code == 0
    assert [n["name"] for n in ls_json("--kind", "embeddings")["names"]] == ["emb"]
    assert [n["name"] for n in ls_json("--kind", "text")["names"]] == ["tiny", "tiny-colors"]
    assert [n["name"] for n in ls_json()["names"]] == ["emb", "tiny", "tiny-colors"]


def test_the_demo_kit_is_listed_once_built(
    isolated_home: Path, demo_kit: DemoKit, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A new user runs `mlxman demo`, then `mlxman ls`: the demo's models are there without any setting."""
    monkeypatch.delenv("MLXMAN_MODEL_DIRS", raising=False)
    _use_cache(monkeypatch, tmp_path / "no-cache-here")
    kit = isolated_home / "demo" / demo_kit.root.name
    shutil.copytree(demo_kit.root, kit)
    library = scan(budget_bytes=10**12)
    assert str(kit) in library.model_dirs and "demo" in library.model_dirs_source
    assert {Path(m.path).name for m in library.models if m.path} >= {"text-model", "embeddings-model"}
    # Named in model_dirs too, it is listed once.
    (isolated_home / "config.toml").write_text(f"model_dirs = [{json.dumps(str(kit))}]\n")
    again = scan(budget_bytes=10**12)
    assert again.model_dirs == [str(kit)] and len(again.models) == len(library.models)
