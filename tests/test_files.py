"""Every user file mlxman or a loader opens is a regular file, bounded by kind; a FIFO never blocks."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from mlxman import files
from mlxman.demo import DemoKit
from mlxman.errors import AdapterError, ConfigError, MlxmanError, ModelError, NotFoundError
from mlxman.files import FileProblem
from tests.helpers import finishes, run_cli, run_subprocess

GIB = 1024**3
LONG_NAME = "n" * 300


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


def replace(path: Path, make: Callable[[Path], None]) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    make(path)


def fifo(path: Path) -> None:
    os.mkfifo(path)


def dev_zero(path: Path) -> None:
    path.symlink_to("/dev/zero")


def loop(path: Path) -> None:
    path.symlink_to(path.name + ".other")
    path.with_name(path.name + ".other").symlink_to(path.name)


def sparse_4gb(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b"{")
    os.truncate(path, 4 * GIB)


def deep_config(path: Path) -> None:
    path.write_text(deep_object(100_000))


# -- files.py itself


def test_wording_for_each_kind_of_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dev").symlink_to("/dev/null")
    loop(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to("nowhere")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        expected = {
            "dir": "is a directory, not a file",
            "fifo": "is a FIFO (named pipe), not a file",
            "dev": "is a device, not a file",
            "loop": "is a symlink loop",
            "dangling": "is a dangling symlink",
            "missing": "is missing",
            "sock": "is a socket, not a file",
            LONG_NAME: "name too long",
        }
        for name, words in expected.items():
            with pytest.raises(FileProblem) as info:
                files.check_regular_file(tmp_path / name)
            assert words in str(info.value), name
            assert str(info.value).startswith(files.shown_name(tmp_path / name))
    finally:
        sock.close()
    assert files.path_problem(tmp_path / "dir", want_dir=True) is None
    assert files.path_problem(tmp_path / "fifo", want_dir=True) == "is a FIFO (named pipe), not a folder"
    assert "too long" in str(files.path_problem(tmp_path / LONG_NAME / "config.json"))


def test_long_names_are_shortened_in_messages(tmp_path: Path) -> None:
    shown = files.shown_name(tmp_path / LONG_NAME)
    assert len(shown) < 80 and "300 characters" in shown


def test_exists_never_raises(tmp_path: Path) -> None:
    loop(tmp_path / "loop")
    assert files.exists(tmp_path / "loop")  # Path.exists() says False for a loop
    assert not files.exists(tmp_path / LONG_NAME)  # Path.exists() raises OSError here
    assert not files.exists(tmp_path / "missing")


def test_fifo_never_blocks_a_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "config.json")
    error = finishes(lambda: files.read_bounded(tmp_path / "config.json", files.CONFIG_MAX_BYTES))
    assert isinstance(error, FileProblem) and "FIFO" in str(error)


def test_fifo_swapped_in_after_the_check_is_refused_on_the_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race: the path was a file at stat time and is a FIFO when opened. Skip the first check to stage it.
    os.mkfifo(tmp_path / "config.json")
    monkeypatch.setattr(files, "check_regular_file", lambda path: None)
    error = finishes(lambda: files.read_bounded(tmp_path / "config.json", files.CONFIG_MAX_BYTES))
    assert isinstance(error, FileProblem) and "FIFO" in str(error)


def test_size_bound_before_any_read(tmp_path: Path) -> None:
    sparse_4gb(tmp_path / "config.json")
    with pytest.raises(FileProblem, match="over the 16,777,216-byte limit for a model config"):
        files.read_bounded(tmp_path / "config.json", files.CONFIG_MAX_BYTES, "a model config")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (nested_json(100_000).encode(), "nested too deeply"),
        (deep_object(100_000).encode(), "nested too deeply"),
        # Shallow enough for json, too deep for loaders that walk configs recursively.
        (deep_object(500).encode(), "nested too deeply"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[1, 2]", "not an object"),
        (b"{", "not valid JSON"),
    ],
)
def test_json_content_errors(content: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        files.parse_json_object(content)


def test_real_shapes_pass(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"a": {"b": {"c": [1, 2, {"d": 3}]}}}))
    assert files.read_json_object(tmp_path / "config.json")["a"]["b"]["c"][2] == {"d": 3}


# -- models: resolve_model and read_config


def model_copy(kit: DemoKit, dst: Path) -> Path:
    shutil.copytree(kit.model, dst)
    return dst


MODEL_CASES: list[tuple[str, str, Callable[[Path], None], str]] = [
    ("fifo_tokenizer", "tokenizer.json", fifo, "tokenizer.json is a FIFO (named pipe), not a file"),
    ("dev_zero_tokenizer", "tokenizer.json", dev_zero, "tokenizer.json is a device, not a file"),
    ("sparse_config", "config.json", sparse_4gb, "config.json is 4,294,967,296 bytes, over the"),
    ("deep_config", "config.json", deep_config, "config.json is nested too deeply"),
    ("loop_weights", "model.safetensors", loop, "model.safetensors is a symlink loop"),
    ("fifo_config", "config.json", fifo, "config.json is a FIFO (named pipe), not a file"),
    ("sparse_tokenizer", "tokenizer.json", sparse_4gb, "tokenizer.json is 4,294,967,296 bytes, over the"),
    ("dev_zero_tokenizer_config", "tokenizer_config.json", dev_zero, "tokenizer_config.json is a device"),
    ("fifo_weights", "model.safetensors", fifo, "model.safetensors is a FIFO (named pipe), not a file"),
]


@pytest.fixture
def broken_model(request: pytest.FixtureRequest, demo_kit: DemoKit, tmp_path: Path) -> tuple[Path, str]:
    _, name, make, words = request.param
    model = model_copy(demo_kit, tmp_path / "model")
    replace(model / name, make)
    return model, words


def case_ids(cases: list[tuple[str, str, Callable[[Path], None], str]]) -> list[str]:
    return [c[0] for c in cases]


@pytest.mark.parametrize("broken_model", MODEL_CASES, ids=case_ids(MODEL_CASES), indirect=True)
def test_pool_load_refuses_at_once(broken_model: tuple[Path, str]) -> None:
    from mlxman.pool import ModelPool

    model, words = broken_model
    with ModelPool(GIB) as pool:
        error = finishes(lambda: pool.load(str(model)))
        assert isinstance(error, MlxmanError), repr(error)
        assert words in str(error)
        assert pool.status().entries == []


def test_a_blocked_file_never_holds_up_other_loads(demo_kit: DemoKit, tmp_path: Path) -> None:
    """A FIFO tokenizer used to hang its load inside the pool's global load lock, and every load after it."""
    from mlxman.pool import ModelPool

    bad = model_copy(demo_kit, tmp_path / "bad")
    replace(bad / "tokenizer.json", fifo)
    with ModelPool(GIB) as pool:
        assert isinstance(finishes(lambda: pool.load(str(bad))), ModelError)
        assert finishes(lambda: pool.load(str(demo_kit.model))) is None
        assert [e.key for e in pool.status().entries] == [str(demo_kit.model.resolve())]


@pytest.mark.parametrize("broken_model", MODEL_CASES[:5], ids=case_ids(MODEL_CASES[:5]), indirect=True)
def test_generate_cli_gives_one_error_line(broken_model: tuple[Path, str]) -> None:
    model, words = broken_model
    proc = run_subprocess("generate", "--model", str(model), "--prompt", "hi")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "bug" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], proc.stderr


def test_over_long_path_component(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlxman.models.resolve import resolve_model
    from mlxman.pool import ModelPool

    long_model = str(tmp_path / LONG_NAME)
    # A 4xx in the server (a malformed request), exit 1 in the CLI; the message names the limit.
    for spec in (long_model, f"{tmp_path}/{LONG_NAME}/model"):
        with pytest.raises(ModelError, match=r"name too long.*255"):
            resolve_model(spec)
    with ModelPool(GIB) as pool, pytest.raises(ModelError, match="name too long") as info:
        pool.load(long_model)
    assert LONG_NAME not in str(info.value) and "(300 characters)" in str(info.value)  # shortened
    with ModelPool(GIB) as pool, pytest.raises(AdapterError, match="name too long"):
        pool.load(str(demo_kit.model), str(tmp_path / LONG_NAME))
    proc = run_subprocess("generate", "--model", long_model, "--prompt", "hi")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "bug" not in proc.stderr
    assert "name too long" in proc.stderr


def test_safetensors_bounded_by_its_header(demo_kit: DemoKit, tmp_path: Path) -> None:
    """Bytes past what the header declares are no safetensors file (the format forbids them)."""
    from mlxman.models.preflight import check_loader_files

    model = model_copy(demo_kit, tmp_path / "model")
    size = (model / "model.safetensors").stat().st_size
    os.truncate(model / "model.safetensors", size + 4 * GIB)
    with pytest.raises(
        ModelError, match=re.escape("model.safetensors has 4,294,967,296 bytes after its last tensor")
    ):
        check_loader_files(model)


def test_preflight_walks_subfolders_and_ignores_what_no_loader_opens(
    demo_kit: DemoKit, tmp_path: Path
) -> None:
    from mlxman.models.preflight import check_loader_files

    model = tmp_path / "emb"
    shutil.copytree(demo_kit.embeddings_model, model)
    os.mkfifo(model / "README.md")  # no loader opens these
    (model / "train.jsonl").touch()
    os.truncate(model / "train.jsonl", 4 * GIB)
    (model / "chat_template.jinja").symlink_to("/dev/zero")  # transformers opens this one
    with pytest.raises(ModelError, match=re.escape("chat_template.jinja is a device")):
        check_loader_files(model)
    (model / "chat_template.jinja").unlink()
    (model / ".cache").mkdir()
    os.mkfifo(model / ".cache" / "lock")
    check_loader_files(model)
    replace(model / "1_Pooling" / "config.json", fifo)
    with pytest.raises(ModelError, match=re.escape("1_Pooling/config.json is a FIFO")):
        check_loader_files(model)


def test_preflight_of_an_adapter_baked_into_a_load(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlxman.models.preflight import check_loader_files

    adapter = tmp_path / "adapter"
    shutil.copytree(demo_kit.adapters["colors"], adapter)
    check_loader_files(demo_kit.model, adapter)
    replace(adapter / "adapters.safetensors", dev_zero)
    with pytest.raises(AdapterError, match=re.escape("adapters.safetensors is a device")):
        check_loader_files(demo_kit.model, adapter)


# -- adapters: wording for special files (item 17)


def adapter_copy(kit: DemoKit, dst: Path) -> Path:
    shutil.copytree(kit.adapters["colors"], dst)
    return dst


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (fifo, "is a FIFO (named pipe), not a file"),
        (dev_zero, "is a device, not a file"),
        (loop, "is a symlink loop"),
    ],
)
def test_adapter_weights_wording(
    demo_kit: DemoKit, tmp_path: Path, make: Callable[[Path], None], words: str
) -> None:
    from mlxman.adapters.info import adapter_info
    from mlxman.adapters.validate import validate_adapter
    from mlxman.pool import ModelPool

    adapter = adapter_copy(demo_kit, tmp_path / "adapter")
    replace(adapter / "adapters.safetensors", make)
    report = validate_adapter(adapter, demo_kit.model)
    text = report.summary()
    assert words in text and "missing" not in text
    with pytest.raises(AdapterError) as info:
        adapter_info(adapter)
    assert words in str(info.value) and "missing" not in str(info.value)
    with ModelPool(GIB) as pool:
        error = finishes(lambda: pool.load(str(demo_kit.model), str(adapter)))
        assert isinstance(error, AdapterError) and "missing" not in str(error)
        assert words in str(error) or "adapters.safetensors" in str(error)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (fifo, "is a FIFO (named pipe), not a file"),
        (dev_zero, "is a device, not a file"),
        (loop, "is a symlink loop"),
    ],
)
def test_base_weights_wording_in_validate(
    demo_kit: DemoKit, tmp_path: Path, make: Callable[[Path], None], words: str
) -> None:
    from mlxman.adapters.validate import validate_adapter

    model = model_copy(demo_kit, tmp_path / "model")
    replace(model / "model.safetensors", make)
    text = finishes_value(lambda: validate_adapter(demo_kit.adapters["colors"], model).summary())
    assert words in text and "missing" not in text


def finishes_value(call: Callable[[], str]) -> str:
    box: list[str] = []
    assert finishes(lambda: box.append(call())) is None
    return box[0]


def test_symlink_loop_adapter_folder(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlxman.adapters.info import adapter_info
    from mlxman.adapters.validate import validate_adapter
    from mlxman.pool import ModelPool

    loop(tmp_path / "adapter")
    text = validate_adapter(tmp_path / "adapter").summary()
    assert "is a symlink loop" in text and "does not exist" not in text
    with pytest.raises(AdapterError, match="is a symlink loop"):
        adapter_info(tmp_path / "adapter")
    with ModelPool(GIB) as pool, pytest.raises(AdapterError, match="is a symlink loop"):
        pool.load(str(demo_kit.model), str(tmp_path / "adapter"))
    result = run_cli("adapter", "validate", str(tmp_path / "adapter"))
    assert result.exit_code == 1 and "is a symlink loop" in result.stdout + result.stderr


def test_fifo_adapter_folder_and_config(demo_kit: DemoKit, tmp_path: Path) -> None:
    from mlxman.adapters.validate import validate_adapter
    from mlxman.pool import ModelPool

    os.mkfifo(tmp_path / "fifo-folder")
    assert "is a FIFO (named pipe), not a folder" in validate_adapter(tmp_path / "fifo-folder").summary()
    adapter = adapter_copy(demo_kit, tmp_path / "adapter")
    replace(adapter / "adapter_config.json", fifo)
    with ModelPool(GIB) as pool:
        error = finishes(lambda: pool.load(str(demo_kit.model), str(adapter)))
        assert isinstance(error, AdapterError) and "adapter_config.json is a FIFO" in str(error)


def test_adapter_cli_long_name(tmp_path: Path) -> None:
    result = run_cli("adapter", "validate", str(tmp_path / LONG_NAME))
    assert result.exit_code in (1, 2) and "name too long" in result.stdout + result.stderr


# -- other user files: config.toml, images


def test_settings_file_that_is_a_fifo(tmp_path: Path) -> None:
    from mlxman.settings import load_config

    os.mkfifo(tmp_path / "config.toml")
    error = finishes(lambda: load_config(tmp_path / "config.toml"))
    assert isinstance(error, ConfigError) and "config.toml is a FIFO" in str(error)
    (tmp_path / "big.toml").touch()
    os.truncate(tmp_path / "big.toml", 4 * GIB)
    with pytest.raises(ConfigError, match="over the"):
        load_config(tmp_path / "big.toml")
    (tmp_path / "empty.toml").touch()
    assert load_config(tmp_path / "empty.toml").values == {}


def test_image_paths(tmp_path: Path) -> None:
    from mlxman.vision import check_images

    os.mkfifo(tmp_path / "cat.png")
    with pytest.raises(NotFoundError, match=re.escape("cat.png is a FIFO")):
        check_images([str(tmp_path / "cat.png")])
    with pytest.raises(NotFoundError, match="name too long"):
        check_images([str(tmp_path / LONG_NAME)])


@pytest.mark.parametrize("recorded", ["x" * 300, "/" + "x" * 300 + "/model", "/a\x00b", "LOOP"])
def test_recorded_base_path_never_breaks_validation(demo_kit: DemoKit, tmp_path: Path, recorded: str) -> None:
    """adapter_config.json's `model` is user data: a path Path.exists() or resolve() would raise on."""
    from mlxman.adapters.validate import validate_adapter

    adapter = adapter_copy(demo_kit, tmp_path / "adapter")
    if recorded == "LOOP":
        loop(tmp_path / "loop")
        recorded = str(tmp_path / "loop")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["model"] = recorded
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = validate_adapter(adapter, demo_kit.model)
    assert report.ok and any("records base" in f.message for f in report.findings)


def test_fuse_and_deep_validation_check_files_before_mlx_lm(demo_kit: DemoKit, tmp_path: Path) -> None:
    """`adapter fuse` and `validate --deep` hand the base folder to mlx-lm, which opens its files itself."""
    from mlxman.adapters.deep import deep_check
    from mlxman.adapters.fuse import fuse_adapter
    from mlxman.adapters.validate import validate_adapter

    model = model_copy(demo_kit, tmp_path / "model")
    replace(model / "tokenizer.json", fifo)
    error = finishes(lambda: fuse_adapter(str(model), demo_kit.adapters["colors"], tmp_path / "fused"))
    assert isinstance(error, ModelError) and "tokenizer.json is a FIFO" in str(error)
    assert not (tmp_path / "fused").exists()
    replace(model / "tokenizer.json", lambda p: shutil.copy(demo_kit.model / "tokenizer.json", p))
    (model / "generation_config.json").symlink_to("/dev/zero")
    report = validate_adapter(demo_kit.adapters["colors"], model)
    text = finishes_value(lambda: deep_check(report, model).summary())
    assert "generation_config.json is a device" in text


def test_tensors_are_loaded_through_a_checked_descriptor(
    demo_kit: DemoKit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlxman's own mx.load calls (adapter swap, convert, --deep) read a descriptor checked to be regular."""
    from mlxman.safetensors_header import HeaderError, load_tensors

    weights = load_tensors(demo_kit.adapters["colors"] / "adapters.safetensors")
    assert weights and all(v.size for v in weights.values())
    os.mkfifo(tmp_path / "adapters.safetensors")
    monkeypatch.setattr(files, "check_regular_file", lambda path: None)  # the file was swapped after a check
    error = finishes(lambda: load_tensors(tmp_path / "adapters.safetensors"))
    assert isinstance(error, HeaderError) and "FIFO" in str(error)


@pytest.mark.parametrize("depth", [500, 100_000])
def test_deep_tokenizer_is_a_clear_model_error(demo_kit: DemoKit, tmp_path: Path, depth: int) -> None:
    """Past json's recursion limit, or only past the tokenizers library's (128): a ModelError, never a bug."""
    from mlxman.pool import ModelPool

    model = model_copy(demo_kit, tmp_path / "model")
    text = (model / "tokenizer.json").read_text().rstrip()
    (model / "tokenizer.json").write_text(text[:-1] + ', "deep": ' + nested_json(depth) + "}")
    # Bigger than the preflight parses, as real tokenizer.json files are: the loader meets it.
    with open(model / "tokenizer.json", "a") as f:
        f.write(" " * (1024 * 1024))
    with ModelPool(GIB) as pool:
        error = finishes(lambda: pool.load(str(model)))
        assert isinstance(error, ModelError) and str(model) in str(error), repr(error)
    proc = run_subprocess("generate", "--model", str(model), "--prompt", "hi")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "bug" not in proc.stderr
    assert proc.stderr.startswith("Error: Cannot load text model")
