"""Split a lazily loaded mlx-lm model over a group (pipeline stages or tensor-parallel shards)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.errors import ModelError

PIPELINE = "pipeline"
TENSOR = "tensor"
SHARD_MODES = (PIPELINE, TENSOR)


@dataclass(frozen=True)
class ShardPlan:
    """What this rank holds: the mode, its place in the group and, under pipeline, blocks [start, end)."""

    mode: str
    rank: int
    size: int
    num_layers: int
    start: int
    end: int

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.end


def _pipelined_llama_classes() -> tuple[type, type]:
    """Pipeline stages for mlx-lm's llama, which lacks ``PipelineMixin``: the forward of mlx-lm's qwen2."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.llama import LlamaModel, Model
    from mlx_lm.models.pipeline import PipelineMixin

    class PipelinedLlamaModel(PipelineMixin, LlamaModel):  # type: ignore[misc]
        def __call__(self, inputs: Any, cache: Any = None, input_embeddings: Any = None) -> Any:
            h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
            layers = self.pipeline_layers
            if cache is None:
                cache = [None] * len(layers)
            masks: dict[bool, Any] = {}
            for layer, c in zip(layers, cache, strict=True):
                if layer.use_sliding not in masks:
                    window = self.sliding_window if layer.use_sliding else None
                    masks[layer.use_sliding] = create_attention_mask(h, c, window_size=window)
            rank, size = self.pipeline_rank, self.pipeline_size
            # Stages run from the last rank (first blocks) down to rank 0 (last blocks).
            if rank < size - 1:
                h = mx.distributed.recv_like(h, rank + 1)
            for layer, c in zip(layers, cache, strict=True):
                h = layer(h, masks[layer.use_sliding], cache=c)
            if rank != 0:
                h = mx.distributed.send(h, (rank - 1) % size)
                if cache[-1] is not None:
                    cache[-1].keys = mx.depends(cache[-1].keys, h)
            if size > 1:
                h = mx.distributed.all_gather(h)[: h.shape[0]]
            return self.norm(h)

    class PipelinedLlama(Model):  # type: ignore[misc]
        @property
        def layers(self) -> Any:
            return self.model.pipeline_layers

    return PipelinedLlamaModel, PipelinedLlama


_LLAMA_CLASSES: tuple[type, type] | None = None


def _enable_pipeline(model: Any) -> bool:
    """Give ``model`` pipeline stages: mlx-lm's where it has them, mlxman's for llama; False if neither."""
    global _LLAMA_CLASSES
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "pipeline"):
        return True
    from mlx_lm.models.llama import LlamaModel, Model

    if type(model) is Model and type(inner) is LlamaModel:
        if _LLAMA_CLASSES is None:
            _LLAMA_CLASSES = _pipelined_llama_classes()
        inner_cls, outer_cls = _LLAMA_CLASSES
        # PipelineMixin.__init__ never ran: give the instance its attributes as the mixin would.
        inner.__class__ = inner_cls
        inner.pipeline_rank, inner.pipeline_size, inner.start_idx, inner.end_idx = 0, 1, 0, None
        model.__class__ = outer_cls
        return True
    return False


def load_lazy(model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The model with its weights mapped but not read: shapes and dtypes are known, no bytes are taken yet."""
    from mlx_lm.utils import load_model

    try:
        model, config = load_model(model_dir, lazy=True, strict=False)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise ModelError(f"Cannot load {model_dir}: {exc}", "check the model folder on every host") from None
    return model, config


def shard_model(model: Any, group: Any, mode: str) -> ShardPlan:
    """Split ``model`` in place for this rank of ``group``; refuse, naming the other mode, what it cannot."""
    num_layers = len(model.layers)
    rank, size = group.rank(), group.size()
    model_type = getattr(model, "model_type", type(model).__name__)
    if mode == PIPELINE:
        if not _enable_pipeline(model):
            other = " use --shard tensor, which it supports" if hasattr(model, "shard") else ""
            raise ModelError(
                f"Model type {model_type!r} has no pipeline stages in mlx-lm",
                (other or "run it on one machine") + "; pipeline stages exist for llama and mlx-lm's "
                "PipelineMixin models (qwen2, qwen3_moe, deepseek_v3, ...)",
            )
        if num_layers < size:
            raise ModelError(
                f"The model has {num_layers} blocks, fewer than the {size} ranks",
                "use fewer hosts, or --shard tensor",
            )
        model.model.pipeline(group)
        return ShardPlan(PIPELINE, rank, size, num_layers, model.model.start_idx, model.model.end_idx)
    if not hasattr(model, "shard"):
        raise ModelError(
            f"Model type {model_type!r} has no tensor-parallel shard in mlx-lm", "use --shard pipeline"
        )
    try:
        model.shard(group)
    except ValueError as exc:
        raise ModelError(
            f"Model type {model_type!r} cannot be split over {size} ranks: {exc}", "use --shard pipeline"
        ) from None
    return ShardPlan(TENSOR, rank, size, num_layers, 0, num_layers)


def materialize(model: Any) -> None:
    """Read this rank's weights, and no more.

    A row slice of a tensor keeps the whole tensor's buffer alive in MLX, so the shards of all-to-sharded
    linears (split along their rows) are copied out one module at a time; mlx-lm's ``sharded_load`` keeps
    them as slices and holds those tensors whole (2x their share).
    """
    import mlx.core as mx
    from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear
    from mlx.utils import tree_map

    for _, module in model.named_modules():
        if isinstance(module, (AllToShardedLinear, QuantizedAllToShardedLinear)):
            params: Any = module.parameters()  # type: ignore[no-untyped-call]
            mx.eval(params)
            module.update(tree_map(mx.array, params))
            mx.eval(module.parameters())  # type: ignore[no-untyped-call]
            del params
    mx.eval(model.parameters())


def parameter_bytes(model: Any) -> int:
    """Bytes of the parameters this rank keeps, from their shapes and dtypes: nothing is read to count."""
    from mlx.utils import tree_flatten

    flat: Any = tree_flatten(model.parameters())
    return sum(int(v.nbytes) for _, v in flat)


def kv_bytes_per_token(model: Any, dtype_bytes: int) -> int:
    """KV-cache bytes per token on this rank: keys and values of the blocks it runs, its share of heads."""
    per_token = 0
    for layer in model.layers:
        attn = getattr(layer, "self_attn", None)
        kv_heads = getattr(attn, "n_kv_heads", None)
        head_dim = getattr(attn, "head_dim", None)
        if not (isinstance(kv_heads, int) and isinstance(head_dim, int)):
            continue
        per_token += 2 * kv_heads * head_dim * dtype_bytes
    return per_token
