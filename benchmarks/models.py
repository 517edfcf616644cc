"""Benchmark models and adapters, built once by the demo kit's builder and cached under benchmarks/results."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mlxman.demo.training import LORA_KEYS

# Bump when a recipe below changes: cached models built by an older recipe are rebuilt.
RECIPE_VERSION = 1
BUILT_MARKER = "BENCHMARK_BUILD.json"
# Every linear of a llama block: what a LoRA fine-tune with mlx-lm's defaults on all layers adapts.
LINEARS = LORA_KEYS
ADAPTER_RANK = 8


@dataclass(frozen=True)
class ModelSpec:
    """One llama shape. Every size has the same number of blocks, so an adapter swap touches as many
    modules on each and only the base's width (and so its bytes) grows."""

    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    layers: int = 6


QUICK_SIZES = (
    ModelSpec("h256", hidden=256, heads=8, kv_heads=4, intermediate=704),
    ModelSpec("h512", hidden=512, heads=8, kv_heads=2, intermediate=1408),
    ModelSpec("h1024", hidden=1024, heads=16, kv_heads=4, intermediate=2816),
)
FULL_SIZES = (
    ModelSpec("h384", hidden=384, heads=6, kv_heads=2, intermediate=1024),
    ModelSpec("h1024", hidden=1024, heads=16, kv_heads=4, intermediate=2816),
    ModelSpec("h2048", hidden=2048, heads=16, kv_heads=4, intermediate=5632),
)
DTYPES = ("float16", "bfloat16", "q4")


def _cached(out: Path, recipe: dict[str, Any]) -> bool:
    marker = out / BUILT_MARKER
    return marker.is_file() and json.loads(marker.read_text()) == recipe


def _finish(out: Path, recipe: dict[str, Any]) -> Path:
    (out / BUILT_MARKER).write_text(json.dumps(recipe))
    return out


def make_endless(model_dir: Path) -> None:
    """End-of-sequence becomes <unk> (id 0), which random weights all but never pick greedily, so every
    generation runs to max_tokens and both sides of a comparison decode the same number of tokens."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        config = json.loads(path.read_text())
        config["eos_token"] = "<unk>"
        path.write_text(json.dumps(config, indent=2))
    config = json.loads((model_dir / "config.json").read_text())
    config["eos_token_id"] = 0
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def build_model(root: Path, spec: ModelSpec, dtype: str) -> Path:
    """A random-weight llama of ``spec`` in ``dtype`` (float16, bfloat16, float32 or q4), cached."""
    out = root / f"{spec.name}-{dtype}"
    recipe = {"recipe": RECIPE_VERSION, "spec": asdict(spec), "dtype": dtype}
    if _cached(out, recipe):
        return out
    shutil.rmtree(out, ignore_errors=True)
    if dtype == "q4":
        source = build_model(root, spec, "float16")
        from mlx_lm.convert import convert

        # convert() narrates on stdout; the benchmark's own lines stay readable without it.
        with contextlib.redirect_stdout(io.StringIO()):
            convert(str(source), str(out), quantize=True, q_bits=4, q_group_size=64)
        return _finish(out, recipe)
    from mlxman.demo.text import build_text_model

    build_text_model(
        out,
        hidden=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        intermediate=spec.intermediate,
        dtype=dtype,
        pretrain_steps=0,
    )
    make_endless(out)
    return _finish(out, recipe)


def linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each adapted linear, from config.json (a quantized base has the same logical shapes)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }


def synthesize_adapter(
    model_dir: Path, out: Path, *, rank: int = ADAPTER_RANK, seed: int, fine_tune_type: str = "lora"
) -> Path:
    """A valid mlx-lm adapter with random lora_a/lora_b for every linear of every block, cached."""
    # The base's own build record is part of the key: a rebuilt base gets fresh adapters.
    recipe = {
        "recipe": RECIPE_VERSION,
        "base": json.loads((model_dir / BUILT_MARKER).read_text()),
        "rank": rank,
        "seed": seed,
        "type": fine_tune_type,
    }
    if _cached(out, recipe):
        return out
    import mlx.core as mx

    config = json.loads((model_dir / "config.json").read_text())
    dims = linear_shapes(config)
    dtype = (
        mx.float16
        if config.get("torch_dtype") in (None, "float16") or "quantization" in config
        else (getattr(mx, config["torch_dtype"]))
    )
    mx.random.seed(seed)
    weights: dict[str, Any] = {}
    for layer in range(config["num_hidden_layers"]):
        for name in LINEARS:
            d_in, d_out = dims[name]
            prefix = f"model.layers.{layer}.{name}"
            weights[f"{prefix}.lora_a"] = (mx.random.normal((d_in, rank)) * 0.01).astype(dtype)
            weights[f"{prefix}.lora_b"] = (mx.random.normal((rank, d_out)) * 0.01).astype(dtype)
            if fine_tune_type == "dora":
                weights[f"{prefix}.m"] = mx.ones((d_out,), dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    adapter_config = {
        "fine_tune_type": fine_tune_type,
        "num_layers": config["num_hidden_layers"],
        "lora_parameters": {"rank": rank, "scale": 10.0, "dropout": 0.0, "keys": list(LINEARS)},
        "model": str(model_dir.name),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return _finish(out, recipe)


def adapters_for(root: Path, model_dir: Path, count: int) -> list[Path]:
    """``count`` distinct rank-8 LoRA adapters for ``model_dir``."""
    return [
        synthesize_adapter(model_dir, root / f"{model_dir.name}-lora{i}", seed=100 + i) for i in range(count)
    ]


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the weights, from the safetensors headers."""
    from mlxman.pool.estimate import model_headers

    return sum(h.data_bytes for h in model_headers(model_dir))


def adapter_file_bytes(adapter_dir: Path) -> int:
    from mlxman.pool.estimate import adapter_bytes

    return adapter_bytes(adapter_dir)
