"""Per-row LoRA slots on one resident base: each row of a batch wears its own adapter in one forward pass.

Each targeted linear gets a ``SlotLinear`` holding stacked ``A [S, in, r]`` and ``B [S, r, out]``; the bank
holds one ``scale [S]``. Slot 0 is "no adapter" and stays zero. Before each forward the caller names every
row's slot (``SlotBank.select``); the LoRA term is gathered per row (``mx.gather_mm``, ``rhs_indices``).
The stacks are ``r`` wide, the largest rank resident (never above ``max_rank``): they widen when a higher-rank
adapter is written and narrow when it leaves, so rank-8 adapters under a rank-16 limit do not multiply zeros.
Lower ranks are zero-padded and modules or layers an adapter lacks stay zero, which adds exact zeros.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

# Imported from their modules: mypy does not see through mlx.nn's star imports.
from mlx.nn.layers.base import Module
from mlx.nn.layers.linear import Linear
from mlx.nn.layers.quantized import QuantizedLinear

from mlxman.errors import UsageError
from mlxman.pool.swap import AdapterWeights

NO_ADAPTER = 0
DEFAULT_SLOTS = 8
DEFAULT_MAX_RANK = 16


def gather_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype of the per-row LoRA: ``dtype`` where ``gather_mm`` supports it on this device, else float32.

    Measured on CPU (mlx 0.32): gather_mm only supports float32 there, and upcasting fp16/bf16 rows to run it
    in float32 beat ``x @ A[ids]`` in the native dtype (fp16 decode at batch 8: 107 vs 215 us per layer).
    Float32 is also what mlx-lm computes in for a float32 adapter on a half-precision base.
    """
    try:
        a, b = mx.zeros((1, 1, 2), dtype), mx.zeros((1, 2, 2), dtype)
        mx.eval(mx.gather_mm(a, b, rhs_indices=mx.array([0], mx.uint32)))
    except (RuntimeError, ValueError):
        return mx.float32
    return dtype


def linear_dims(module: Any) -> tuple[int, int] | None:
    """(in, out) of a plain or quantized linear; None for anything else (embeddings, MoE, custom layers)."""
    if type(module) is Linear:
        out_dims, in_dims = module.weight.shape
        return int(in_dims), int(out_dims)
    if type(module) is QuantizedLinear:
        out_dims, packed = module.weight.shape
        return int(packed) * 32 // int(module.bits), int(out_dims)
    return None


@dataclass(eq=False)
class RowSelection:
    """Which slot each row of the next forward uses; shared by every SlotLinear of a bank."""

    ids: mx.array | None = None  # [B] uint32; None when no row wears an adapter
    present: frozenset[int] = frozenset()
    single: int | None = None  # the slot, when every row wears the same one
    scale: mx.array | None = None  # [B, 1, 1] per-row scale, or a scalar for ``single``


@dataclass(eq=False)
class _Stack:
    a: mx.array  # [S, in, r]
    b: mx.array  # [S, r, out]
    occupied: set[int] = field(default_factory=set)

    @property
    def nbytes(self) -> int:
        return int(self.a.nbytes) + int(self.b.nbytes)


class SlotLinear(Module):
    """A base linear plus a per-row LoRA term: ``base(x) + scale[row] * (x @ A[row]) @ B[row]``."""

    def __init__(self, base: Module, stack: _Stack, rows: RowSelection, dtype: mx.Dtype) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.base = base
        # Plain attributes, not parameters: the stacks are the bank's, and the base's names stay the model's.
        self._stack = stack
        self._rows = rows
        self._dtype = dtype

    def __call__(self, x: mx.array) -> mx.array:
        y: mx.array = self.base(x)
        rows, stack = self._rows, self._stack
        if rows.ids is None or rows.present.isdisjoint(stack.occupied):
            return y
        h = x if x.dtype == self._dtype else x.astype(self._dtype)
        if rows.single is not None:
            z = (h @ stack.a[rows.single]) @ stack.b[rows.single]
        else:
            # gather_mm treats x [B, L, in] as B matrices and picks each row's A and B by slot.
            z = mx.gather_mm(mx.gather_mm(h, stack.a, rhs_indices=rows.ids), stack.b, rhs_indices=rows.ids)
        assert rows.scale is not None
        return y + (rows.scale * z).astype(x.dtype)


def slot_problem(adapter: AdapterWeights, modules: dict[str, Any], max_rank: int) -> str | None:
    """Why ``adapter`` cannot share a batch through slots on a model with ``modules``; None when it can."""
    kind = adapter.fine_tune_type
    if kind != "lora":
        return f"it is a {kind} adapter; slots hold plain LoRA only"
    scale = adapter.lora_parameters.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        return "its lora_parameters have no numeric scale"
    for path, pair in _pairs(adapter).items():
        if set(pair) != {"lora_a", "lora_b"}:
            return f"{path} has tensors {sorted(pair)}, not one lora_a and one lora_b"
        module = modules.get(path)
        if isinstance(module, SlotLinear):
            module = module.base
        if module is None:
            return f"{path} is not a module of this model"
        dims = linear_dims(module)
        if dims is None:
            return f"{path} is a {type(module).__name__}; slots cover Linear and QuantizedLinear layers only"
        a, b = pair["lora_a"], pair["lora_b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != dims:
            return f"{path} has lora shapes {tuple(a.shape)} and {tuple(b.shape)}, which do not fit {dims}"
        if a.shape[1] > max_rank:
            return f"its rank {a.shape[1]} is above the slot maximum {max_rank}"
    return None


def adapter_rank(adapter: AdapterWeights) -> int:
    """The largest LoRA rank among ``adapter``'s modules (0 for an adapter with no lora_a)."""
    return max((int(t.shape[1]) for n, t in adapter.weights.items() if n.endswith(".lora_a")), default=0)


def _pairs(adapter: AdapterWeights) -> dict[str, dict[str, mx.array]]:
    """Adapter tensors grouped by module path: {path: {leaf: tensor}}."""
    pairs: dict[str, dict[str, mx.array]] = {}
    for name, tensor in adapter.weights.items():
        path, _, leaf = name.rpartition(".")
        pairs.setdefault(path, {})[leaf] = tensor
    return pairs


class SlotBank:
    """The adapter slots of one base model. Not thread-safe: only the base's scheduler thread touches it."""

    def __init__(self, model: Any, *, slots: int = DEFAULT_SLOTS, max_rank: int = DEFAULT_MAX_RANK) -> None:
        if slots < 1 or max_rank < 1:
            raise UsageError(
                f"Adapter slots need at least 1 slot and rank 1, got {slots} and {max_rank}",
                "pass a positive slot count and maximum rank",
            )
        self.model = model
        self.size = slots + 1  # slot 0 is the plain base
        self.max_rank = max_rank
        self.width = 0  # the stacks' rank: the largest resident adapter's
        self.rows = RowSelection()
        self._modules: dict[str, Any] = dict(model.named_modules())
        first = next((m for m in self._modules.values() if linear_dims(m) is not None), None)
        weight_dtype = mx.float32 if first is None else _activation_dtype(first)
        self.dtype = gather_dtype(weight_dtype)
        self._scales = mx.zeros((self.size,), self.dtype)
        # Evaluated here: MLX streams are per thread, and the engine thread must not run this thread's graph.
        mx.eval(self._scales)
        self._targets: dict[str, SlotLinear] = {}
        self._stacks: dict[str, _Stack] = {}
        self._adapters: list[AdapterWeights | None] = [None] * self.size
        self._active = [0] * self.size
        self._used = [0] * self.size
        self._clock = itertools.count(1)
        self._attached = True

    # -- which adapters fit

    def problem(self, adapter: AdapterWeights) -> str | None:
        """Why ``adapter`` cannot use a slot here (None when it can); such requests run alone, swapped in."""
        return slot_problem(adapter, self._modules, self.max_rank)

    # -- slots

    def slot_of(self, adapter: AdapterWeights | None) -> int | None:
        if adapter is None:
            return NO_ADAPTER
        for slot, held in enumerate(self._adapters):
            if held is adapter:
                return slot
        return None

    def acquire(self, adapter: AdapterWeights | None) -> int | None:
        """A slot holding ``adapter`` for one more row (writing it into a free slot if needed); None when all
        slots hold adapters with active rows. Raises UsageError for an adapter that cannot use slots."""
        slot = self.slot_of(adapter)
        if slot is None:
            assert adapter is not None
            slot = self._free_slot()
            if slot is None:
                return None
            self.write_slot(slot, adapter)
        self._active[slot] += 1
        self._used[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        """One row on ``slot`` has left the batch; the slot stays written (LRU) for the next request."""
        if self._active[slot] <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        self._active[slot] -= 1

    def active_rows(self, slot: int) -> int:
        return self._active[slot]

    def resident(self) -> list[AdapterWeights]:
        return [a for a in self._adapters if a is not None]

    def _free_slot(self) -> int | None:
        free = [s for s in range(1, self.size) if self._active[s] == 0]
        if not free:
            return None
        empty = [s for s in free if self._adapters[s] is None]
        return empty[0] if empty else min(free, key=lambda s: self._used[s])

    def write_slot(self, slot: int, adapter: AdapterWeights) -> None:
        """Load ``adapter`` into ``slot`` (replacing what it held); its rank is zero-padded to the stacks'
        width, which first widens (or narrows) to the largest rank resident with it."""
        if not 1 <= slot < self.size:
            raise ValueError(f"slot {slot} is outside 1..{self.size - 1}")
        if self._active[slot]:
            raise RuntimeError(f"slot {slot} has {self._active[slot]} active row(s)")
        why = self.problem(adapter)
        if why is not None:
            raise UsageError(f"Adapter {adapter.path} cannot use a slot: {why}", "run it on the swap path")
        self._clear(slot)
        self._fit_width(max(adapter_rank(adapter), self._resident_rank()))
        written: list[mx.array] = []
        for path, pair in _pairs(adapter).items():
            stack = self._stack(path)
            a, b = pair["lora_a"].astype(self.dtype), pair["lora_b"].astype(self.dtype)
            rank = a.shape[1]
            stack.a[slot, :, :rank] = a
            stack.b[slot, :rank, :] = b
            stack.occupied.add(slot)
            written += [stack.a, stack.b]
        self._scales[slot] = float(adapter.lora_parameters["scale"])
        mx.eval(written, self._scales)
        self._adapters[slot] = adapter

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot``; targets no slot uses any more go back to their plain base linear, and the stacks
        narrow to the largest rank still resident."""
        self._clear(slot)
        self._fit_width(self._resident_rank())

    def _clear(self, slot: int) -> None:
        if self._active[slot]:
            raise RuntimeError(f"slot {slot} has {self._active[slot]} active row(s)")
        if self._adapters[slot] is None:
            return
        for path, stack in list(self._stacks.items()):
            if slot not in stack.occupied:
                continue
            stack.occupied.discard(slot)
            if not stack.occupied:
                self._drop_target(path)
            else:
                stack.a[slot] = 0
                stack.b[slot] = 0
                mx.eval(stack.a, stack.b)
        self._scales[slot] = 0
        self._adapters[slot] = None

    def _resident_rank(self) -> int:
        return max((adapter_rank(a) for a in self._adapters if a is not None), default=0)

    def _fit_width(self, width: int) -> None:
        """Re-pad (or cut) every stack to rank ``width``; what lies beyond a resident rank is zero, so cutting
        drops only zeros. One stack at a time, so the extra memory while this runs is one stack at most."""
        if width == self.width:
            return
        grow = width - self.width
        for stack in self._stacks.values():
            if grow > 0:
                a = mx.pad(stack.a, [(0, 0), (0, 0), (0, grow)])
                b = mx.pad(stack.b, [(0, 0), (0, grow), (0, 0)])
            else:
                # Copied row-major: gather_mm ran a strided slice of the old stack 2x slower on the CPU.
                a = mx.contiguous(stack.a[:, :, :width])
                b = mx.contiguous(stack.b[:, :width, :])
            mx.eval(a, b)
            stack.a, stack.b = a, b
        self.width = width

    def _stack(self, path: str) -> _Stack:
        stack = self._stacks.get(path)
        if stack is not None:
            return stack
        base = self._modules[path]
        dims = linear_dims(base)
        assert dims is not None
        in_dims, out_dims = dims
        stack = _Stack(
            a=mx.zeros((self.size, in_dims, self.width), self.dtype),
            b=mx.zeros((self.size, self.width, out_dims), self.dtype),
        )
        self._stacks[path] = stack
        self._targets[path] = SlotLinear(base, stack, self.rows, self.dtype)
        if self._attached:
            self._update(self._targets[path], path)
        return stack

    def _drop_target(self, path: str) -> None:
        wrapper = self._targets.pop(path)
        del self._stacks[path]
        if self._attached:
            self._update(wrapper.base, path)

    def _update(self, module: Module, path: str) -> None:
        from mlx.utils import tree_unflatten

        self.model.update_modules(tree_unflatten([(path, module)]))

    # -- attaching (the swap path needs the plain base linears back)

    def detach(self) -> None:
        """Put the plain base linears back, e.g. before mlx-lm's LoRA wrappers go on for a swap-path run."""
        if self._attached:
            for path, wrapper in self._targets.items():
                self._update(wrapper.base, path)
            self._attached = False

    def attach(self) -> None:
        if not self._attached:
            for path, wrapper in self._targets.items():
                self._update(wrapper, path)
            self._attached = True

    # -- per forward

    def select(self, slots: Sequence[int]) -> None:
        """Name the slot of every row of the next forward (in batch order)."""
        rows = self.rows
        present = frozenset(s for s in slots if s != NO_ADAPTER)
        if not present:
            rows.ids, rows.present, rows.single, rows.scale = None, present, None, None
            return
        rows.present = present
        rows.ids = mx.array(list(slots), dtype=mx.uint32)
        if len(set(slots)) == 1:
            rows.single = slots[0]
            rows.scale = self._scales[slots[0]]
        else:
            rows.single = None
            rows.scale = self._scales[rows.ids].reshape(-1, 1, 1)

    # -- memory

    @property
    def nbytes(self) -> int:
        """Bytes the slots hold now (stacks for every targeted linear, plus the scales)."""
        return sum(s.nbytes for s in self._stacks.values()) + int(self._scales.nbytes)

    def growth_bytes(self, adapter: AdapterWeights) -> int:
        """Bytes writing ``adapter`` would add: stacks for linears no resident adapter targets yet, and the
        widening of every stack when its rank is above the stacks' width. The adapter it replaces is not
        subtracted: the write may free bytes, never take more than this."""
        itemsize = self.dtype.size
        width = max(self.width, adapter_rank(adapter))
        total = 0
        for stack in self._stacks.values():
            in_dims, out_dims = stack.a.shape[1], stack.b.shape[2]
            total += self.size * (width - self.width) * (in_dims + out_dims) * itemsize
        for path in _pairs(adapter):
            if path in self._stacks:
                continue
            dims = linear_dims(self._modules.get(path))
            if dims is not None:
                total += self.size * width * (dims[0] + dims[1]) * itemsize
        return total

    def targets(self) -> Iterable[str]:
        return self._targets.keys()


def _activation_dtype(linear: Any) -> mx.Dtype:
    """The dtype activations flow in: a quantized linear's scales dtype, else its weight dtype."""
    if isinstance(linear, QuantizedLinear):
        return linear.scales.dtype  # type: ignore[no-any-return]
    return linear.weight.dtype  # type: ignore[no-any-return]
