"""LoRA/DoRA adapters on a sharded base: each rank wraps and fills only what it holds, and swaps in place.

Pipeline stages hold whole blocks: a rank wraps the blocks it runs (block numbers stay those of the full
model, so ``num_layers`` means what it means on one machine) and keeps only their adapter tensors.
Tensor parallelism splits each linear: for an all-to-sharded linear (output split) ``lora_b`` is split along
its output like the weight; for a sharded-to-all linear (input split) ``lora_a`` is split along its input and
the rank-sized product ``x @ lora_a`` is summed over the group before ``lora_b``. DoRA needs whole weight rows
for its norm, so under tensor parallelism it is refused (pipeline stages take it).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from mlxman.distributed.sharding import PIPELINE, TENSOR, ShardPlan
from mlxman.errors import AdapterError
from mlxman.pool.swap import (
    ADAPTER_LEAVES,
    SWAPPABLE_TYPES,
    AdapterWeights,
    Applied,
    strip_adapter,
    wrappers,
)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# mlx-lm models whose ``shard`` splits fused projections in segments: a plain split of A or B would be wrong.
SEGMENTED_SHARDS = frozenset({"kimi_k3", "muse_spark", "qwen3_5"})


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _sharded_lora_class() -> type:
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    class ShardedInputLoRALinear(LoRALinear):  # type: ignore[misc]
        """LoRA on a sharded-to-all linear: ``lora_a`` holds this rank's input rows; one sum over ranks."""

        def __call__(self, x: Any) -> Any:
            y = self.linear(x)
            z = mx.distributed.all_sum(self.dropout(x) @ self.lora_a, group=self.linear.group) @ self.lora_b
            return y + (self.scale * z).astype(x.dtype)

    return ShardedInputLoRALinear


_SHARDED_INPUT: type | None = None


def _blocks(model: Any, plan: ShardPlan) -> list[tuple[int, Any]]:
    """(block number in the full model, block) for every block this rank runs."""
    layers = model.model.layers if plan.mode == PIPELINE else model.layers
    return [(i, block) for i, block in enumerate(layers) if block is not None and plan.holds(i)]


def _first_block(num_layers: Any, total: int) -> int:
    # mlx-lm wraps ``layers[-max(num_layers, 0):]``: 0, -1 or more than the model has mean every block.
    n = num_layers if isinstance(num_layers, int) and not isinstance(num_layers, bool) else 0
    return total - n if 0 < n <= total else 0


def _default_keys(blocks: list[tuple[int, Any]]) -> set[str]:
    from mlx.nn.layers.distributed import (
        AllToShardedLinear,
        QuantizedAllToShardedLinear,
        QuantizedShardedToAllLinear,
        ShardedToAllLinear,
    )
    from mlx.nn.layers.embedding import Embedding
    from mlx.nn.layers.linear import Linear
    from mlx.nn.layers.quantized import QuantizedEmbedding, QuantizedLinear
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    types = (
        Linear,
        QuantizedLinear,
        SwitchLinear,
        QuantizedSwitchLinear,
        Embedding,
        QuantizedEmbedding,
        AllToShardedLinear,
        QuantizedAllToShardedLinear,
        ShardedToAllLinear,
        QuantizedShardedToAllLinear,
    )
    keys: set[str] = set()
    for _, block in blocks:
        for path, module in block.named_modules():
            if hasattr(module, "to_lora") or isinstance(module, types):
                keys.add(path)
    return keys


def _wrap(module: Any, path: str, adapter: AdapterWeights) -> Any:
    """The LoRA/DoRA wrapper for a module as mlx-lm's ``linear_to_lora_layers`` picks, plus sharded kinds."""
    global _SHARDED_INPUT
    from mlx.nn.layers.distributed import (
        AllToShardedLinear,
        QuantizedAllToShardedLinear,
        QuantizedShardedToAllLinear,
        ShardedToAllLinear,
    )
    from mlx.nn.layers.embedding import Embedding
    from mlx.nn.layers.linear import Linear
    from mlx.nn.layers.quantized import QuantizedEmbedding, QuantizedLinear
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    p = adapter.lora_parameters
    dora = adapter.fine_tune_type == "dora"
    args = {"r": p["rank"], "scale": p["scale"], "dropout": p.get("dropout", 0.0)}
    sharded_out = (AllToShardedLinear, QuantizedAllToShardedLinear)
    sharded_in = (ShardedToAllLinear, QuantizedShardedToAllLinear)
    if isinstance(module, sharded_out + sharded_in):
        if dora:
            raise AdapterError(
                f"Adapter {adapter.path} is DoRA, which cannot be split over tensor-parallel ranks ({path})",
                "use --shard pipeline (each rank keeps whole blocks), or a LoRA adapter",
            )
        # This rank's (output, input) from its weight: the share lora_b (output split) or lora_a (input
        # split) must have. A quantized weight packs 32 // bits inputs in each uint32.
        out_dims, in_dims = module.weight.shape
        if hasattr(module, "bits"):
            in_dims = in_dims * 32 // module.bits
        if isinstance(module, sharded_out):
            lora = LoRALinear(in_dims, out_dims, **args)
        else:
            if _SHARDED_INPUT is None:
                _SHARDED_INPUT = _sharded_lora_class()
            lora = _SHARDED_INPUT(in_dims, out_dims, **args)
        lora.linear = module
        return lora
    if not dora and hasattr(module, "to_lora"):
        return module.to_lora(**args)
    if isinstance(module, (Linear, QuantizedLinear)):
        return (DoRALinear if dora else LoRALinear).from_base(module, **args)
    if isinstance(module, (SwitchLinear, QuantizedSwitchLinear)) and not dora:
        return LoRASwitchLinear.from_base(module, **args)
    if isinstance(module, (Embedding, QuantizedEmbedding)):
        return (DoRAEmbedding if dora else LoRAEmbedding).from_base(module, **args)
    raise AdapterError(
        f"Adapter {adapter.path} targets {path} ({type(module).__name__}), which cannot take LoRA here",
        "use an adapter whose keys name linear layers",
    )


def _local_tensor(name: str, w: Any, wrapper: Any, plan: ShardPlan) -> Any:
    """This rank's part of an adapter tensor: split like the linear it wraps, copied out of the whole."""
    import mlx.core as mx
    from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

    if plan.mode != TENSOR or w.ndim != 2:
        return w
    inner = wrapper.linear
    leaf = name.rpartition(".")[2]
    if leaf == "lora_b" and isinstance(inner, (AllToShardedLinear, QuantizedAllToShardedLinear)):
        part = w.shape[1] // plan.size
        return mx.array(w[:, plan.rank * part : (plan.rank + 1) * part])
    if leaf == "lora_a" and _SHARDED_INPUT is not None and isinstance(wrapper, _SHARDED_INPUT):
        part = w.shape[0] // plan.size
        return mx.array(w[plan.rank * part : (plan.rank + 1) * part])
    return w


def check_adapter(adapter: AdapterWeights, plan: ShardPlan, model_type: str) -> None:
    """Refuse what a sharded base cannot wear before wrapping anything."""
    if adapter.fine_tune_type not in SWAPPABLE_TYPES:
        raise AdapterError(
            f"Adapter {adapter.path} has fine_tune_type {adapter.fine_tune_type!r}, "
            "which a sharded base cannot wear",
            "use a lora or dora adapter; a full fine-tune is its own model",
        )
    if plan.mode == TENSOR and adapter.fine_tune_type == "dora":
        raise AdapterError(
            f"Adapter {adapter.path} is DoRA, which cannot be split over tensor-parallel ranks",
            "use --shard pipeline (each rank keeps whole blocks), or a LoRA adapter",
        )
    if plan.mode == TENSOR and model_type in SEGMENTED_SHARDS:
        raise AdapterError(
            f"Model type {model_type!r} splits fused projections for tensor parallelism, "
            "which its adapters are not split by",
            "use --shard pipeline",
        )


def apply_sharded(model: Any, adapter: AdapterWeights, plan: ShardPlan) -> Applied:
    """Wrap this rank's part of the base, fill the wrappers with its part of the adapter; strip on failure."""
    from mlx.utils import tree_unflatten

    check_adapter(adapter, plan, str(getattr(model, "model_type", "")))
    try:
        blocks = _blocks(model, plan)
        p = adapter.lora_parameters
        keys = p.get("keys")
        keys = set(keys) if isinstance(keys, list) else _default_keys(blocks)
        first = _first_block(adapter.config.get("num_layers"), plan.num_layers)
        for index, block in blocks:
            if index < first:
                continue
            found = [(k, _wrap(m, k, adapter)) for k, m in block.named_modules() if k in keys]
            if found:
                block.update_modules(tree_unflatten(found))
        top = [(k, _wrap(m, k, adapter)) for k, m in model.named_modules() if k in keys]
        if top:
            model.update_modules(tree_unflatten(top))
        found_wrappers = dict(wrappers(model))
        slots, local, problems = [], {}, []
        for name, w in adapter.weights.items():
            path, _, leaf = name.rpartition(".")
            layer = layer_of(name)
            if layer is not None and not plan.holds(layer):
                continue  # another stage's block
            module = found_wrappers.get(path)
            if module is None or leaf not in ADAPTER_LEAVES or leaf not in module:
                problems.append(f"{name}: not an adapter parameter in the model")
                continue
            part = _local_tensor(name, w, module, plan)
            if tuple(part.shape) != tuple(module[leaf].shape):
                problems.append(f"{name}: shape {tuple(w.shape)} does not match the model")
                continue
            local[name] = part
            slots.append((module, leaf, name))
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError("; ".join(problems[:5]) + more)
        for module, leaf, name in slots:
            module[leaf] = local[name]
        model.eval()
    except AdapterError:
        strip_adapter(model)
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        strip_adapter(model)
        raise AdapterError(
            f"Adapter {adapter.path} cannot be applied to this base: {exc}",
            f"check it with `mlxman adapter validate {adapter.path} --model <base>`",
        ) from None
    held = AdapterWeights(path=adapter.path, config=adapter.config, weights=local)
    return Applied(adapter=held, wrappers=found_wrappers, slots=slots)


@dataclass(frozen=True)
class ShardedSwap:
    mode: str  # "none", "strip", "weights" or "structural"
    seconds: float
    applied: Applied | None


def swap_sharded(
    model: Any, current: Applied | None, nxt: AdapterWeights | None, plan: ShardPlan
) -> ShardedSwap:
    """Move this rank's part of the base from ``current`` to ``nxt`` (None: plain base), never reloading it.

    When the two adapters wrap the same modules with the same shapes, only the tensors change.
    """
    started = time.perf_counter()
    if current is None and nxt is None:
        return ShardedSwap("none", 0.0, None)
    if current is not None and nxt is not None and current.adapter.path == nxt.path:
        return ShardedSwap("none", 0.0, current)
    if nxt is None:
        strip_adapter(model, current)
        return ShardedSwap("strip", time.perf_counter() - started, None)
    if current is not None and _same_layout(current, nxt):
        fitted = _fit_weights(current, nxt, plan)
        if fitted is not None:
            return ShardedSwap("weights", time.perf_counter() - started, fitted)
    strip_adapter(model, current)
    applied = apply_sharded(model, nxt, plan)
    return ShardedSwap("structural", time.perf_counter() - started, applied)


def _same_layout(current: Applied, nxt: AdapterWeights) -> bool:
    a, b = current.adapter, nxt
    pa, pb = a.lora_parameters, b.lora_parameters
    return (
        a.fine_tune_type == b.fine_tune_type
        and a.config.get("num_layers") == b.config.get("num_layers")
        and pa.get("keys") == pb.get("keys")
        and pa.get("rank") == pb.get("rank")
        and pa.get("dropout") == pb.get("dropout")
    )


def _fit_weights(current: Applied, nxt: AdapterWeights, plan: ShardPlan) -> Applied | None:
    """The next adapter's tensors in the current wrappers, or None when they do not fit exactly."""
    local = {}
    for module, leaf, name in current.slots:
        w = nxt.weights.get(name)
        if w is None:
            return None
        part = _local_tensor(name, w, module, plan)
        if tuple(part.shape) != tuple(module[leaf].shape):
            return None
        local[name] = part
    wanted = {n for n in nxt.weights if (layer := layer_of(n)) is None or plan.holds(layer)}
    if wanted != set(local):
        return None
    for module, leaf, name in current.slots:
        module[leaf] = local[name]
    scale = nxt.lora_parameters.get("scale")
    for module in current.wrappers.values():
        module.scale = scale
    held = AdapterWeights(path=nxt.path, config=nxt.config, weights=local)
    return Applied(adapter=held, wrappers=current.wrappers, slots=current.slots)
