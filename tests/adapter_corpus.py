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
    Case("config_unreadable", unreadable(CONFIG), "cannot be read", needs_non_root=True),
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
    Case("weights_unreadable", unreadable(WEIGHTS), "cannot be read", needs_non_root=True),
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


# -- Real-world adapter_config.json shapes -------------------------------------------------------------
# Each shape is the set of keys (and their kinds of values) a public adapter folder or a trainer writes,
# applied to the demo base: the weights are what that trainer would save for it on this base. ``source``
# names where the shape was seen (repository and path), not code taken from it.


@dataclass(frozen=True)
class RealShape:
    """``loads``: today's mlx-lm loads the mlx shape (for PEFT shapes: mlxman converts it faithfully).
    ``culprit``: words an error must carry when it does not."""

    name: str
    source: str
    config: dict[str, Any]
    loads: bool = True
    culprit: str = ""


_MLX_LM_0_2X_ARGS: dict[str, Any] = {
    "adapter_path": "adapters",
    "batch_size": 4,
    "clear_cache_threshold": 0,
    "config": None,
    "data": "data",
    "grad_accumulation_steps": 1,
    "grad_checkpoint": False,
    "iters": 50,
    "learning_rate": 1e-05,
    "lr_schedule": None,
    "mask_prompt": False,
    "max_seq_length": 2048,
    "model": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "project_name": None,
    "report_to": None,
    "resume_adapter_file": None,
    "save_every": 100,
    "seed": 0,
    "steps_per_eval": 200,
    "steps_per_report": 10,
    "test": False,
    "test_batches": 500,
    "train": True,
    "val_batches": 25,
}
_MLX_LM_0_1X_ARGS = {
    k: v
    for k, v in _MLX_LM_0_2X_ARGS.items()
    if k not in ("clear_cache_threshold", "grad_accumulation_steps", "mask_prompt", "optimizer",
                 "optimizer_config", "project_name", "report_to")
}  # fmt: skip

MLX_SHAPES: list[RealShape] = [
    RealShape(
        # The default num_layers (16) on a base with fewer blocks: mlx-lm wraps every block.
        "mlx_lm_defaults_num_layers_over_blocks",
        "kilojoules/REDKWEEN adapters/adapter_config.json (mlx-lm 0.2x, no keys: every linear of a block)",
        {
            **_MLX_LM_0_2X_ARGS,
            "fine_tune_type": "lora",
            "num_layers": 16,
            "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
        },
    ),
    RealShape(
        "mlx_lm_last_blocks_only",
        "Farmerobot/among_them adapters/adapter_config.json (num_layers 4 of 28 blocks; here 1 of 2)",
        {
            **_MLX_LM_0_2X_ARGS,
            "fine_tune_type": "lora",
            "num_layers": 1,
            "optimizer_config": {"adam": {}, "adamw": {}},
            "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 10.0},
        },
    ),
    RealShape(
        "mlx_lm_minimal_config",
        "haytamdon/MLX-GRPO adapters/adapter_config.json (num_layers and lora_parameters only)",
        {"num_layers": 8, "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.3}},
    ),
    RealShape(
        "mlx_lm_alpha_beside_scale",
        "Duke-AIPI-LLM-Course/project-1-tweetpolice adapters/adapter_config.json (alpha is ignored)",
        {
            **_MLX_LM_0_2X_ARGS,
            "fine_tune_type": "lora",
            "num_layers": 16,
            "lora_parameters": {"rank": 8, "alpha": 16, "dropout": 0.0, "scale": 10.0},
        },
    ),
    RealShape(
        # mlx_lm.lora -c YAML copies every YAML key into adapter_config.json (mlx_lm/lora.py main), and
        # training YAMLs carry other trainers' names for the same settings.
        "mlx_lm_with_peft_style_keys",
        "ml-explore/mlx-lm mlx_lm/lora.py (YAML keys kept); lora_rank/lora_alpha/lora_layers from YAMLs",
        {
            **_MLX_LM_0_2X_ARGS,
            "config": "lora_config.yaml",
            "fine_tune_type": "lora",
            "num_layers": 16,
            "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_layers": 16,
            "lora_dropout": 0.0,
        },
    ),
    RealShape(
        "mlx_lm_dora_query_value",
        "ml-explore/mlx-examples llms/mlx_lm/examples/lora_config.yaml (dora; keys q_proj, v_proj)",
        {
            **_MLX_LM_0_2X_ARGS,
            "fine_tune_type": "dora",
            "num_layers": 16,
            "lora_parameters": {
                "keys": ["self_attn.q_proj", "self_attn.v_proj"],
                "rank": 8,
                "scale": 20.0,
                "dropout": 0.0,
            },
        },
    ),
    RealShape(
        "mlx_lm_full_with_lora_parameters",
        "Albx68/finetuning adapters/adapter_config.json (fine_tune_type full, lora_parameters left in)",
        {
            **_MLX_LM_0_1X_ARGS,
            "fine_tune_type": "full",
            "num_layers": 16,
            "lora_parameters": {"rank": 8, "alpha": 16, "dropout": 0.0, "scale": 10.0},
        },
    ),
    RealShape(
        "mlx_lm_full_null_lora_parameters",
        "ml-explore/mlx-lm mlx_lm/lora.py train_model (full sets lora_parameters to None before saving)",
        {**_MLX_LM_0_2X_ARGS, "fine_tune_type": "full", "num_layers": 1, "lora_parameters": None},
    ),
    RealShape(
        "mlx_lm_legacy_lora_layers",
        "alphrc/lilm adapters/adapter_config.json (older mlx-lm: lora_layers, use_dora, no num_layers)",
        {
            **_MLX_LM_0_1X_ARGS,
            "lora_layers": -1,
            "use_dora": False,
            "lora_parameters": {"rank": 8, "alpha": 16, "dropout": 0.0, "scale": 10.0},
        },
        loads=False,
        culprit='rename "lora_layers" to "num_layers"',
    ),
    RealShape(
        "mlx_lm_legacy_keys_rank_128",
        "deboradum/SouthParkDataset adapters/adapter_config.json (lora_layers 32, seven keys, rank 128)",
        {
            **_MLX_LM_0_1X_ARGS,
            "config": "lora_config.yaml",
            "lora_layers": 32,
            "use_dora": False,
            "resume_adapter_file": "adapters/0000790_adapters.safetensors",
            "lora_parameters": {
                "keys": list(LORA_KEYS),
                "rank": 128,
                "alpha": 256,
                "scale": 10.0,
                "dropout": 0.05,
            },
        },
        loads=False,
        culprit="num_layers",
    ),
]

_PEFT_0_19: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "auto_mapping": None,
    "base_model_name_or_path": "google/paligemma-3b-pt-224",
    "bias": "none",
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 16,
    "lora_bias": False,
    "lora_dropout": 0.05,
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "peft_version": "0.19.1",
    "qalora_group_size": 16,
    "r": 8,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["v_proj", "o_proj", "q_proj", "k_proj"],
    "target_parameters": None,
    "task_type": "CAUSAL_LM",
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "use_rslora": False,
}
_PEFT_0_13 = {
    k: v
    for k, v in _PEFT_0_19.items()
    if k not in ("alora_invocation_tokens", "arrow_config", "corda_config", "ensure_weight_tying",
                 "lora_ga_config", "peft_version", "qalora_group_size", "target_parameters",
                 "trainable_token_indices", "use_bdlora", "use_qalora")
}  # fmt: skip

PEFT_SHAPES: list[RealShape] = [
    RealShape(
        "peft_0_19_attention",
        "eardage/Fine-Tuning-PaliGemma-With-RISC-Dataset adapters/adapter_config.json (PEFT 0.19.1)",
        _PEFT_0_19,
    ),
    RealShape(
        # phi-2's "dense" is the attention output; on this llama base that is o_proj.
        "peft_0_13_rank_16",
        "Shilpaj1994/SFT-with-QLoRA adapters/adapter_config.json (r 16, alpha 32, q/v/k/dense)",
        {**_PEFT_0_13, "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj", "k_proj", "o_proj"]},
    ),
    RealShape(
        "peft_all_linear_string",
        "LoraConfig(target_modules='all-linear') as training scripts write it, e.g. r 16, alpha 32",
        {**_PEFT_0_19, "r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    ),
    RealShape(
        "peft_regex_target",
        "huggingface/peft tests/test_config.py (target_modules as a full-match regex string)",
        {**_PEFT_0_19, "target_modules": r".*\.(q_proj|v_proj)$"},
    ),
    RealShape(
        "peft_last_layer_only",
        "PEFT layers_to_transform [last block], layers_pattern 'layers' (sequence-classification scripts)",
        {
            **_PEFT_0_13,
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "layers_to_transform": [1],
            "layers_pattern": "layers",
        },
    ),
    RealShape(
        "peft_rslora_patterns",
        "huggingface/peft LoraConfig docs (use_rslora, rank_pattern, alpha_pattern)",
        {
            **_PEFT_0_19,
            "use_rslora": True,
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": {"model.layers.1.self_attn.q_proj": 48},
            "target_modules": ["q_proj", "v_proj", "down_proj"],
        },
    ),
]


def _recorded_base(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Training records the base it ran on: here the demo base."""
    config = dict(config)
    for key in ("model", "base_model_name_or_path"):
        if key in config:
            config[key] = str(base)
    return config


def write_mlx_shape(shape: RealShape, base: Path, out: Path, seed: int = 0) -> Path:
    """What mlx-lm's trainer saves for ``shape`` on ``base``: every trainable tensor, moved off its init."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    config = shape.config
    blocks = config.get("num_layers", config.get("lora_layers"))
    fine_tune_type = config.get("fine_tune_type", "dora" if config.get("use_dora") else "lora")
    model, _ = load_model(base)
    model.freeze()
    mx.random.seed(seed)
    if fine_tune_type == "full":
        for layer in model.layers[-max(blocks, 0) :]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, blocks, config["lora_parameters"], use_dora=fine_tune_type == "dora")
    weights = {}
    for name, value in tree_flatten(model.trainable_parameters()):
        # Training moves every tensor away from its init (lora_b starts at zero).
        weights[name] = value + 0.05 * mx.random.normal(value.shape, dtype=value.dtype)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / WEIGHTS), weights, metadata={"format": "mlx"})
    (out / CONFIG).write_text(json.dumps(_recorded_base(config, base), indent=4))
    return out


def peft_modules(config: dict[str, Any], base_weights: dict[str, Any]) -> list[str]:
    """The block modules PEFT adapts for ``config`` (list: name suffixes; string: all-linear or a regex)."""
    import re

    targets = config["target_modules"]
    layers = config.get("layers_to_transform")
    found = []
    for name, value in sorted(base_weights.items()):
        module = name.removesuffix(".weight")
        parts = module.split(".")
        if not name.endswith(".weight") or value.ndim != 2 or "layers" not in parts:
            continue  # embeddings, lm_head and norms are no block linear
        if layers is not None and int(parts[parts.index("layers") + 1]) not in layers:
            continue
        if targets == "all-linear":
            hit = True
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, module) is not None
        else:
            hit = any(module == t or module.endswith("." + t) for t in targets)
        if hit:
            found.append(module)
    return found


def peft_rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """PEFT's per-module rank and alpha: a pattern key matches the end of the module's name."""
    import re

    def pick(pattern: dict[str, Any], default: Any) -> Any:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?(?:{key})$", module):
                return value
        return default

    return pick(config.get("rank_pattern") or {}, config["r"]), pick(
        config.get("alpha_pattern") or {}, config["lora_alpha"]
    )


def write_peft_shape(shape: RealShape, base: Path, out: Path, seed: int = 0) -> Path:
    """What PEFT's save_pretrained writes for ``shape`` on ``base`` (A: (r, in), B: (out, r))."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    base_weights = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(seed)
    tensors = {}
    for module in peft_modules(shape.config, base_weights):
        out_dims, in_dims = base_weights[f"{module}.weight"].shape
        rank, _ = peft_rank_alpha(shape.config, module)
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.3, (rank, in_dims)).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.3, (out_dims, rank)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(_recorded_base(shape.config, base), indent=2))
    return out
