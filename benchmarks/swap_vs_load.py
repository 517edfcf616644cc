"""Adapter switch on a resident base vs a fresh ``mlx_lm.load(base, adapter_path=...)``, as ratios.

Runs on the demo kit's model and on a larger random-weight llama built by the demo builder, with two
synthesized adapters. Prints medians over ``--repeats`` and the load/swap ratios (target: >= 50x on the
larger base, and swap time independent of base size).

    python benchmarks/swap_vs_load.py [--repeats 7] [--hidden 1024 --layers 6] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlxman.demo import ensure_demo_kit
from mlxman.memory import format_bytes
from mlxman.models.resolve import read_config
from mlxman.pool import ModelPool
from mlxman.pool.estimate import model_footprint

GIB = 1024**3
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def synthesize_adapter(
    model_dir: Path, out: Path, rank: int, seed: int, fine_tune_type: str = "lora"
) -> Path:
    """An mlx-lm adapter with random lora_a/lora_b of the right shapes for every linear of every block."""
    config = read_config(model_dir)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    dims = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    mx.random.seed(seed)
    weights = {}
    for layer in range(config["num_hidden_layers"]):
        for name in LINEARS:
            d_in, d_out = dims[name]
            prefix = f"model.layers.{layer}.{name}"
            weights[f"{prefix}.lora_a"] = mx.random.normal((d_in, rank)) * 0.01
            weights[f"{prefix}.lora_b"] = mx.random.normal((rank, d_out)) * 0.01
            if fine_tune_type == "dora":
                weights[f"{prefix}.m"] = mx.ones((d_out,))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": fine_tune_type,
                "num_layers": -1,
                "lora_parameters": {"rank": rank, "scale": 10.0, "dropout": 0.0},
            }
        )
    )
    return out


def lower_rank(src: Path, out: Path, rank: int) -> Path:
    """A trained adapter cut to its first ``rank`` components."""
    weights = mx.load(str(src / "adapters.safetensors"))
    assert isinstance(weights, dict)
    out.mkdir(parents=True, exist_ok=True)
    cut = {k: (v[:, :rank] if k.endswith("lora_a") else v[:rank, :]) for k, v in weights.items()}
    mx.save_safetensors(str(out / "adapters.safetensors"), cut)
    config = json.loads((src / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = rank
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def fresh_load_ms(model: Path, adapter: Path, repeats: int) -> float:
    from mlx_lm import load

    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        m, _tok = load(str(model), adapter_path=str(adapter))
        samples.append(time.perf_counter() - start)
        del m, _tok
    return median_ms(samples)


def swap_ms(model: Path, a: Path, b: Path, repeats: int) -> tuple[float, str]:
    """Median switch time a -> b -> a ... on one resident base, through the pool."""
    samples, modes = [], set()
    with ModelPool(64 * GIB) as pool:
        with pool.acquire(str(model), str(a)):
            pass
        for i in range(repeats * 2):
            with pool.acquire(str(model), str(b if i % 2 == 0 else a)) as lease:
                samples.append(lease.swap_seconds)
                modes.add(lease.swap_mode)
    return median_ms(samples), "/".join(sorted(modes))


def report(label: str, model: Path, adapters: dict[str, Path], repeats: int) -> None:
    config = read_config(model)
    size = model_footprint(model, config, "text", 0).weights_bytes
    load = fresh_load_ms(model, adapters["a"], repeats)
    print(f"\n{label}: base {format_bytes(size)}")
    print(f"  fresh mlx_lm.load(base, adapter_path)  {load:9.2f} ms")
    pairs = {"same shapes": ("a", "b"), "another rank (LoRA)": ("a", "d"), "LoRA <-> DoRA": ("a", "c")}
    for name, (x, y) in pairs.items():
        swap, mode = swap_ms(model, adapters[x], adapters[y], repeats)
        print(f"  swap, {name:29s} {swap:9.2f} ms  ({mode})   load/swap = {load / swap:7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument(
        "--work", type=Path, default=None, help="where to build (default: a temporary directory)"
    )
    parser.add_argument("--kit-home", type=Path, default=None, help="the demo kit's home (default: user dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="mlxman-bench-"))

    kit = ensure_demo_kit(args.kit_home)
    demo_adapters = {"a": kit.adapters["colors"], "b": kit.adapters["numbers"], "c": kit.adapters["animals"]}
    demo_adapters["d"] = lower_rank(kit.adapters["numbers"], work / "numbers-r4", 4)
    report(
        "demo model (trained adapters: colors, numbers, numbers cut to rank 4; animals is DoRA)",
        kit.model,
        demo_adapters,
        args.repeats,
    )

    from mlxman.demo.text import build_text_model

    big = work / f"llama-h{args.hidden}-l{args.layers}"
    if not (big / "model.safetensors").is_file():
        build_text_model(
            big,
            hidden=args.hidden,
            layers=args.layers,
            heads=16,
            kv_heads=4,
            intermediate=int(args.hidden * 2.75),
            pretrain_steps=0,
        )
    big_adapters = {
        "a": synthesize_adapter(big, work / "big-a", rank=8, seed=1),
        "b": synthesize_adapter(big, work / "big-b", rank=8, seed=2),
        "c": synthesize_adapter(big, work / "big-c", rank=16, seed=3, fine_tune_type="dora"),
        "d": synthesize_adapter(big, work / "big-d", rank=16, seed=4),
    }
    report(
        "larger model (synthesized adapters: rank 8, rank 8, rank 16, rank 16 DoRA)",
        big,
        big_adapters,
        args.repeats,
    )


if __name__ == "__main__":
    main()
