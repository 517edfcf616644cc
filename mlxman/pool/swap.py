"""Adapter hot-swap on a resident base: strip LoRA/DoRA wrappers back to the base modules, apply the next."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxman.adapters.config import read_adapter_config
from mlxman.adapters.formats import detect_format
from mlxman.errors import AdapterError
from mlxman.pool.keys import ADAPTER_WEIGHTS
from mlxman.safetensors_header import load_tensors

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
SWAPPABLE_TYPES = ("lora", "dora")


@dataclass(eq=False)
class AdapterWeights:
    """An adapter held in memory: its config and tensors, ready to apply to a base without touching disk."""

    path: Path
    config: dict[str, Any]
    weights: dict[str, mx.array]

    @property
    def fine_tune_type(self) -> str:
        return str(self.config.get("fine_tune_type", "lora"))

    @property
    def lora_parameters(self) -> dict[str, Any]:
        params = self.config.get("lora_parameters")
        return params if isinstance(params, dict) else {}

    @property
    def nbytes(self) -> int:
        return sum(int(w.nbytes) for w in self.weights.values())

    @cached_property
    def layout(self) -> tuple[Any, ...]:
        """Which modules get wrapped, how, and which tensors fill them; ranks and values may differ."""
        p = self.lora_parameters
        keys = p.get("keys")
        return (
            self.fine_tune_type,
            self.config.get("num_layers"),
            tuple(sorted(keys)) if isinstance(keys, list) else keys,
            p.get("dropout"),
            tuple(sorted(self.weights)),
        )


def check_applicable(path: Path, config: dict[str, Any]) -> None:
    """Refuse, with the next step, an adapter format that mlx-lm's wrappers cannot take as is."""
    try:
        files = set(os.listdir(path))
    except OSError:
        return  # reading its files reports that in plain words later
    if detect_format(config, files) == "peft":
        raise AdapterError(
            f"Adapter {path} is a Hugging Face PEFT adapter, which mlx-lm cannot apply as is",
            f"convert it once with `mlxman adapter convert {path} NEW_FOLDER --to mlx` and use NEW_FOLDER",
        )


def read_adapter(path: Path) -> AdapterWeights:
    """Load an adapter's config and tensors (evaluated, so its memory is taken now, not at first use)."""
    config = read_adapter_config(path)
    file = path / ADAPTER_WEIGHTS
    try:
        weights = load_tensors(file)
    except ValueError as exc:
        raise AdapterError(f"Cannot load {file}: {exc}", "retrain or re-download the adapter") from None
    return AdapterWeights(path=path, config=config, weights=weights)


def _wrapper_types() -> tuple[type, ...]:
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear
    from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

    return (LoRALinear, LoRASwitchLinear, LoRAEmbedding, DoRALinear, DoRAEmbedding)


def _inner(module: Any, kinds: tuple[type, ...]) -> Any:
    inner: Any = module
    while _is_wrapper(inner, kinds):
        inner = getattr(inner, "embedding", None) or inner.linear
    return inner


def _is_wrapper(module: Any, kinds: tuple[type, ...]) -> bool:
    return isinstance(module, kinds)


def wrappers(model: Any) -> list[tuple[str, Any]]:
    kinds = _wrapper_types()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


def strip_adapter(model: Any, applied: Applied | None = None) -> int:
    """Replace every LoRA/DoRA wrapper (nested ones too) by the base module it wraps; return how many.

    With ``applied`` (what the last apply wrapped), no walk over the whole model is needed.
    """
    from mlx.utils import tree_unflatten

    kinds = _wrapper_types()
    if applied is not None:
        outer = list(applied.wrappers.items())
    else:
        found = sorted(wrappers(model), key=lambda item: item[0].count("."))
        outer = []
        for name, module in found:
            if not any(name.startswith(prefix + ".") for prefix, _ in outer):
                outer.append((name, module))
    if outer:
        model.update_modules(tree_unflatten([(name, _inner(m, kinds)) for name, m in outer]))
    return len(outer)


@dataclass(eq=False)
class Applied:
    """The adapter a base wears now, with its wrappers and the slot of each tensor, for fast swaps."""

    adapter: AdapterWeights
    wrappers: dict[str, Any]
    slots: list[tuple[Any, str, str]]  # (wrapper module, leaf name, adapter tensor name)


def _slots(adapter: AdapterWeights, found: dict[str, Any]) -> list[tuple[Any, str, str]]:
    """Where each adapter tensor goes; a ValueError lists every tensor with no place or the wrong shape."""
    slots, problems = [], []
    for name, w in adapter.weights.items():
        path, _, leaf = name.rpartition(".")
        module = found.get(path)
        if module is None or leaf not in ADAPTER_LEAVES or leaf not in module:
            problems.append(f"{name}: not an adapter parameter in the model")
        elif tuple(w.shape) != tuple(module[leaf].shape):
            want = tuple(module[leaf].shape)
            problems.append(f"{name}: adapter shape {tuple(w.shape)} does not match {want} in the model")
        else:
            slots.append((module, leaf, name))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError("; ".join(problems[:5]) + more)
    return slots


def apply_adapter(model: Any, adapter: AdapterWeights) -> Applied:
    """Wrap the base as ``mlx_lm.load(base, adapter_path=...)`` does, load the tensors; strip on failure."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if adapter.fine_tune_type not in SWAPPABLE_TYPES:
        raise AdapterError(
            f"Adapter {adapter.path} has fine_tune_type {adapter.fine_tune_type!r}, which cannot be swapped",
            "use a lora or dora adapter; full fine-tunes load as their own model",
        )
    try:
        linear_to_lora_layers(
            model,
            adapter.config["num_layers"],
            adapter.config["lora_parameters"],
            use_dora=adapter.fine_tune_type == "dora",
        )
        found = dict(wrappers(model))
        slots = _slots(adapter, found)
        # What load_weights(strict=False) does, without walking the whole model again.
        for module, leaf, name in slots:
            module[leaf] = adapter.weights[name]
        model.eval()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        strip_adapter(model)
        raise AdapterError(
            f"Adapter {adapter.path} cannot be applied to this base: {exc}",
            f"check it with `mlxman adapter validate {adapter.path} --model <base>`; the base is left plain",
        ) from None
    return Applied(adapter=adapter, wrappers=found, slots=slots)


def _fits_slots(current: Applied, nxt: AdapterWeights) -> bool:
    """Can ``nxt``'s tensors go into the current wrappers? Equal shapes, or another rank of a 2-D LoRA."""
    old, new = current.adapter.weights, nxt.weights
    for _module, leaf, name in current.slots:
        a, b = old[name], new[name]
        if a.shape == b.shape:
            continue
        if leaf not in ("lora_a", "lora_b") or a.ndim != 2 or b.ndim != 2:
            return False
        # lora_a is (in, rank) and lora_b (rank, out): only the rank may change, the same for both.
        keep, rank = (0, 1) if leaf == "lora_a" else (1, 0)
        sibling = name[: -len(leaf)] + ("lora_b" if leaf == "lora_a" else "lora_a")
        if a.shape[keep] != b.shape[keep] or sibling not in new or new[sibling].ndim != 2:
            return False
        if new[sibling].shape[1 - rank] != b.shape[rank]:
            return False
    return True


def _weights_only(current: Applied, adapter: AdapterWeights) -> Applied:
    for module, leaf, name in current.slots:
        module[leaf] = adapter.weights[name]
    # ``scale`` is a Python attribute of each wrapper, not a tensor.
    scale = adapter.lora_parameters.get("scale")
    for module in current.wrappers.values():
        module.scale = scale
    return Applied(adapter=adapter, wrappers=current.wrappers, slots=current.slots)


@dataclass(frozen=True)
class SwapResult:
    mode: str  # "none", "strip", "weights" or "structural"
    seconds: float
    applied: Applied | None


def swap(model: Any, current: Applied | None, nxt: AdapterWeights | None) -> SwapResult:
    """Move ``model`` from the ``current`` adapter to ``nxt`` (None: plain base); failure leaves it plain."""
    started = time.perf_counter()
    if (current.adapter if current else None) is nxt:
        return SwapResult("none", 0.0, current)
    applied: Applied | None = None
    try:
        if nxt is None:
            strip_adapter(model, current)
            mode = "strip"
        elif current is not None and current.adapter.layout == nxt.layout and _fits_slots(current, nxt):
            applied = _weights_only(current, nxt)
            mode = "weights"
        else:
            strip_adapter(model, current)
            applied = apply_adapter(model, nxt)
            mode = "structural"
    except AdapterError:
        raise
    except Exception:
        strip_adapter(model)
        raise
    return SwapResult(mode, time.perf_counter() - started, applied)
