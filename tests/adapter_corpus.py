"""A corpus of malformed adapters, each a real demo-kit adapter with exactly one defect."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.demo.training import LORA_KEYS

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"


@dataclass(frozen=True)
class Case:
    """``culprit`` must appear in an error finding (its place or message); ``with_model`` adds ``--model``."""

    name: str
    defect: Callable[[Path], None]
    culprit: str
    source: str = "colors"
    with_model: bool = False
    needs_non_root: bool = False


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        config = json.loads((d / CONFIG).read_text())
        change(config)
        (d / CONFIG).write_text(json.dumps(config))

    return apply


def edit_params(key: str, value: Any) -> Callable[[Path], None]:
    def change(c: dict[str, Any]) -> None:
        if value is _DELETE:
            c["lora_parameters"].pop(key)
        else:
            c["lora_parameters"][key] = value

    return edit_config(change)


_DELETE = object()


def set_key(key: str, value: Any) -> Callable[[Path], None]:
    def change(c: dict[str, Any]) -> None:
        if value is _DELETE:
            c.pop(key)
        else:
            c[key] = value

    return edit_config(change)


def write_file(name: str, data: bytes) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).unlink()
        (d / name).write_bytes(data)

    return apply


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def make_dir(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).unlink()
        (d / name).mkdir()

    return apply


def symlink_loop(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).unlink()
        os.symlink(f"{name}.other", d / name)
        os.symlink(name, d / f"{name}.other")

    return apply


def dangling(name: str) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        (d / name).unlink()
        os.symlink("nowhere.safetensors", d / name)

    return apply


def sparse(name: str, size: int) -> Callable[[Path], None]:
    """A huge file of zeros that costs no disk."""

    def apply(d: Path) -> None:
        (d / name).unlink()
        with (d / name).open("wb") as f:
            f.truncate(size)

    return apply


def unreadable(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).chmod(0)


def split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def edit_header(change: Callable[[dict[str, Any]], Any], name: str = WEIGHTS) -> Callable[[Path], None]:
    """Rewrite the JSON header in place, keeping the data bytes (the header may become inconsistent)."""

    def apply(d: Path) -> None:
        header, body = split_safetensors(d / name)
        new = change(header)
        raw = json.dumps(header if new is None else new).encode()
        (d / name).write_bytes(struct.pack("<Q", len(raw)) + raw + body)

    return apply


def raw_prefix(length: int, payload: bytes = b"") -> Callable[[Path], None]:
    return write_file(WEIGHTS, struct.pack("<Q", length) + payload)


def first_tensor(header: dict[str, Any], suffix: str = "lora_a") -> str:
    return sorted(k for k in header if k.endswith(suffix))[0]


def set_entry(field: str, value: Any) -> Callable[[Path], None]:
    def change(h: dict[str, Any]) -> None:
        h[first_tensor(h)][field] = value

    return edit_header(change)


def overlap(h: dict[str, Any]) -> None:
    names = sorted(k for k in h if k != "__metadata__")
    a, b = h[names[0]], h[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])
    else:
        # Two same-size tensors: lora_a of two modules of one kind.
        same = [k for k in names if k.endswith("q_proj.lora_a")]
        h[same[1]]["data_offsets"] = list(h[same[0]]["data_offsets"])


def edit_tensors(change: Callable[[dict[str, Any]], None], name: str = WEIGHTS) -> Callable[[Path], None]:
    """Load real tensors with mlx, change the dict, save a well-formed file."""

    def apply(d: Path) -> None:
        import mlx.core as mx

        weights = dict(mx.load(str(d / name)))  # type: ignore[call-overload]
        change(weights)
        mx.save_safetensors(str(d / name), weights)

    return apply


def drop(pattern: str) -> Callable[[Path], None]:
    def change(w: dict[str, Any]) -> None:
        for k in [k for k in w if pattern in k]:
            del w[k]

    return edit_tensors(change)


def reshape_first(suffix: str, shape: Callable[[tuple[int, ...]], tuple[int, ...]]) -> Callable[[Path], None]:
    def change(w: dict[str, Any]) -> None:
        import mlx.core as mx

        name = sorted(k for k in w if k.endswith(suffix))[0]
        w[name] = mx.zeros(shape(tuple(w[name].shape)), dtype=w[name].dtype)

    return edit_tensors(change)


def rename(old: str, new: str) -> Callable[[Path], None]:
    def change(w: dict[str, Any]) -> None:
        for k in [k for k in w if old in k]:
            w[k.replace(old, new)] = w.pop(k)

    return edit_tensors(change)


def add_tensor(name: str) -> Callable[[Path], None]:
    def change(w: dict[str, Any]) -> None:
        import mlx.core as mx

        w[name] = mx.zeros((4, 4))

    return edit_tensors(change)


def cast_first(dtype: str) -> Callable[[Path], None]:
    def change(w: dict[str, Any]) -> None:
        import mlx.core as mx

        name = sorted(k for k in w if k.endswith("lora_a"))[0]
        w[name] = w[name].astype(getattr(mx, dtype))

    return edit_tensors(change)


def both(*defects: Callable[[Path], None]) -> Callable[[Path], None]:
    """Steps that together make one defect (e.g. a renamed module and its key)."""

    def apply(d: Path) -> None:
        for defect in defects:
            defect(d)

    return apply


Q = "model.layers.0.self_attn.q_proj"
KEYS_WITHOUT_DOWN = [k for k in LORA_KEYS if k != "mlp.down_proj"]

CASES: list[Case] = [
    # adapter_config.json as a file
    Case("config_missing", remove(CONFIG), CONFIG),
    Case("config_is_directory", make_dir(CONFIG), "directory"),
    Case("config_not_json", write_file(CONFIG, b"{not json"), "not valid JSON"),
    Case("config_is_list", write_file(CONFIG, b"[1, 2]"), "not an object"),
    Case("config_empty", write_file(CONFIG, b""), "empty"),
    Case("config_binary", write_file(CONFIG, b"\xff\xfe\x00garbage"), "UTF-8"),
    Case("config_huge_zeros", sparse(CONFIG, 64 * 1024 * 1024), "limit"),
    Case("config_symlink_loop", symlink_loop(CONFIG), "symlink loop"),
    Case("config_dangling_symlink", dangling(CONFIG), "dangling"),
    Case("config_unreadable", unreadable(CONFIG), "cannot read", needs_non_root=True),
    # adapter_config.json values
    Case("unknown_fine_tune_type", set_key("fine_tune_type", "qlora"), "qlora"),
    Case("num_layers_missing", set_key("num_layers", _DELETE), "num_layers"),
    Case("num_layers_string", set_key("num_layers", "all"), "num_layers"),
    Case("lora_parameters_missing", set_key("lora_parameters", _DELETE), "lora_parameters"),
    Case("lora_parameters_list", set_key("lora_parameters", [8, 20.0]), "lora_parameters"),
    Case("rank_missing", edit_params("rank", _DELETE), "rank"),
    Case("rank_zero", edit_params("rank", 0), "rank"),
    Case("rank_float", edit_params("rank", 8.5), "rank"),
    Case("rank_bool", edit_params("rank", True), "rank"),
    Case("rank_mismatch", edit_params("rank", 16), "rank 16"),
    Case("scale_missing", edit_params("scale", _DELETE), "scale"),
    Case("alpha_instead_of_scale", both(edit_params("scale", _DELETE), edit_params("alpha", 16)), "alpha"),
    Case(
        "scale_nan",
        write_file(
            CONFIG, b'{"num_layers": -1, "lora_parameters": {"rank": 8, "scale": NaN, "dropout": 0.0}}'
        ),
        "scale",
    ),
    Case("scale_string", edit_params("scale", "20"), "scale"),
    Case("dropout_missing", edit_params("dropout", _DELETE), "dropout"),
    Case("dropout_out_of_range", edit_params("dropout", 1.5), "dropout"),
    Case("keys_not_a_list", edit_params("keys", "self_attn.q_proj"), "keys"),
    Case("keys_not_strings", edit_params("keys", [1, 2]), "keys"),
    Case("keys_leave_out_a_module", edit_params("keys", KEYS_WITHOUT_DOWN), "down_proj"),
    # adapters.safetensors as a file
    Case("weights_missing", remove(WEIGHTS), WEIGHTS),
    Case("weights_only_a_checkpoint", lambda d: (d / WEIGHTS).rename(d / f"0000100_{WEIGHTS}"), "checkpoint"),
    Case("weights_is_directory", make_dir(WEIGHTS), "directory"),
    Case("weights_symlink_loop", symlink_loop(WEIGHTS), "symlink loop"),
    Case("weights_empty", write_file(WEIGHTS, b""), "truncated"),
    Case("weights_truncated_prefix", write_file(WEIGHTS, b"\x10\x00\x00"), "truncated"),
    Case("weights_huge_zeros", sparse(WEIGHTS, 8 * 1024**3), "not valid JSON"),
    Case("weights_unreadable", unreadable(WEIGHTS), "cannot read", needs_non_root=True),
    Case("header_longer_than_file", raw_prefix(4096, b"{}"), "truncated"),
    Case("header_absurd_length", raw_prefix(2**60, b"{}"), "limit"),
    Case("header_invalid_json", raw_prefix(9, b"{oops:..."), "not valid JSON"),
    Case("header_not_object", raw_prefix(6, b"[1, 2]"), "not a JSON object"),
    Case("header_no_tensors", raw_prefix(2, b"{}"), "no tensors"),
    Case("offsets_out_of_range", set_entry("data_offsets", [0, 10**9]), "outside"),
    Case("offsets_overlapping", edit_header(overlap), "overlap"),
    Case("unknown_dtype", set_entry("dtype", "F7"), "F7"),
    Case("shape_disagrees_with_bytes", set_entry("shape", [3, 3]), "needs"),
    # tensors
    Case("lora_b_missing", drop(f"{Q}.lora_b"), Q),
    Case("ranks_disagree", reshape_first("q_proj.lora_b", lambda s: (4, s[1])), "disagree"),
    Case("stray_tensor", add_tensor(f"{Q}.weight"), f"{Q}.weight"),
    Case("integer_dtype", cast_first("int32"), "I32"),
    Case("block_left_out", drop("model.layers.0."), "coverage"),
    Case("one_dimensional_lora_a", reshape_first("q_proj.lora_a", lambda s: (s[0] * s[1],)), "pair"),
    Case("dora_magnitude_missing", drop(f"{Q}.m"), Q, source="animals"),
    Case("dora_tensors_declared_lora", set_key("fine_tune_type", "lora"), "magnitude", source="animals"),
    Case("lora_tensors_declared_full", set_key("fine_tune_type", "full"), "full"),
    # against the base model (--model)
    Case(
        "input_size_mismatch",
        reshape_first("layers.0.self_attn.q_proj.lora_a", lambda s: (s[0] // 2, s[1])),
        "input size",
        with_model=True,
    ),
    Case(
        "output_size_mismatch",
        both(reshape_first("layers.0.self_attn.q_proj.lora_b", lambda s: (s[0], 3))),
        "output size",
        with_model=True,
    ),
    Case(
        "module_not_in_base",
        both(
            rename("self_attn.q_proj", "self_attn.qkv_proj"),
            edit_params("keys", ["self_attn.qkv_proj", *KEYS_WITHOUT_DOWN[1:], "mlp.down_proj"]),
        ),
        "qkv_proj",
        with_model=True,
    ),
    Case("block_beyond_base", rename("model.layers.1.", "model.layers.7."), "block 7", with_model=True),
    Case("block_outside_num_layers", set_key("num_layers", 1), "outside", with_model=True),
    Case("module_left_out_of_one_block", drop("layers.1.mlp.up_proj"), "coverage", with_model=True),
]
