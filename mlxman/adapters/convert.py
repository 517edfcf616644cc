"""Convert LoRA adapters between Hugging Face PEFT and mlx-lm, so that both give the same outputs."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mlxman.adapters.base import layers_and_targets, read_base, split_layer
from mlxman.adapters.config import check_config, read_adapter_config
from mlxman.adapters.findings import ValidationReport
from mlxman.adapters.formats import CONFIG_FILE, MLX_WEIGHTS, PEFT_PREFIX, PEFT_WEIGHTS
from mlxman.adapters.validate import validate_adapter
from mlxman.errors import AdapterError, UsageError
from mlxman.safetensors_header import HeaderError, load_tensors
from mlxman.staging import check_destination, write_folder

if TYPE_CHECKING:
    import mlx.core as mx

Target = Literal["mlx", "peft"]
STAGING_PREFIX = ".converting-"


@dataclass(frozen=True)
class ConversionResult:
    source: Path
    destination: Path
    source_format: str
    target_format: str
    modules: int
    rank: int
    scale: float
    num_layers: int | None
    folded_modules: int


def convert_adapter(
    src: str | Path, dst: str | Path, to: Target, model: str | Path | None = None, force: bool = False
) -> ConversionResult:
    """Convert ``src`` into a new adapter folder ``dst`` in format ``to``; refuse unfaithful conversions."""
    src, dst = Path(src), Path(dst)
    if to not in ("mlx", "peft"):
        raise UsageError(f"Unknown target format {to!r}", "use --to mlx or --to peft")
    inputs = [("adapter being converted", src)]
    if model is not None:
        inputs.append(("base model", Path(model)))
    dst = check_destination(dst, inputs, force)
    report = validate_adapter(src, model)
    if not report.ok:
        raise AdapterError(f"Cannot convert an unsound adapter:\n{report.summary()}", "fix it first")
    if report.format == to:
        raise UsageError(f"{src} is already in {to} format", "nothing to convert")
    config = read_adapter_config(src)
    if to == "mlx":
        if report.format != "peft":
            raise UsageError(f"Only PEFT adapters convert to mlx; {src} is {report.format}")
        return _write(dst, force, lambda tmp: _peft_to_mlx(src, tmp, config, model, report))
    if report.format != "mlx":
        raise UsageError(f"Only mlx-lm adapters convert to PEFT; {src} is {report.format}")
    return _write(dst, force, lambda tmp: _mlx_to_peft(src, tmp, config, report))


def _write(dst: Path, force: bool, build: Any) -> ConversionResult:
    """Build into a staging folder beside ``dst``, then move it into place: no half-written adapters."""
    result: ConversionResult = write_folder(dst, build, prefix=STAGING_PREFIX, replace=force)
    return ConversionResult(**{**result.__dict__, "destination": dst})


def _load(path: Path) -> dict[str, mx.array]:
    try:
        return load_tensors(path)  # a descriptor checked to be a regular file: no FIFO swapped in
    except HeaderError as exc:
        raise AdapterError(f"Cannot convert {path.parent}: {exc}", "re-save or re-download it") from None


def _peft_to_mlx(
    src: Path, dst: Path, config: dict[str, Any], model: str | Path | None, report: ValidationReport
) -> ConversionResult:
    import mlx.core as mx

    s = check_config(config, "peft", ValidationReport(adapter_dir=src))
    refuse = []
    if s.fine_tune_type == "dora":
        refuse.append("it is a DoRA adapter (use_dora), whose magnitudes PEFT and mlx-lm compute differently")
    if s.modules_to_save:
        refuse.append(f"it carries whole modules (modules_to_save: {', '.join(s.modules_to_save)})")
    weights = _load(src / PEFT_WEIGHTS)
    if s.bias != "none" or any(n.endswith(".bias") for n in weights):
        refuse.append("it trains biases, which mlx-lm adapters cannot hold")
    if any(".lora_embedding_" in n for n in weights):
        refuse.append("it adapts embeddings, whose PEFT layout mlxman does not convert")
    if refuse:
        raise AdapterError(
            f"Cannot convert {src} faithfully: " + "; ".join(refuse),
            "use it with PEFT, or retrain it with mlx-lm",
        )
    pairs: dict[str, dict[str, mx.array]] = {}
    for name, value in weights.items():
        rest = name[len(PEFT_PREFIX) :]
        module, _, leaf = rest.removesuffix(".weight").rpartition(".")
        pairs.setdefault(module, {})["a" if leaf == "lora_A" else "b"] = value
    scales = {m: s.module_scale(m) for m in pairs}
    ranks = {m: int(p["a"].shape[0]) for m, p in pairs.items()}
    rank = max(ranks.values())
    # One scale for all: the most common one, so that most modules need no folding and stay bit-exact.
    scale = Counter(v for v in scales.values() if v is not None).most_common(1)[0][0]
    out: dict[str, mx.array] = {}
    folded = 0
    for module, p in pairs.items():
        a, b = p["a"].T, p["b"].T  # (in, r) and (r, out)
        own = scales[module]
        assert own is not None
        if own != scale:
            b = (b.astype(mx.float32) * (own / scale)).astype(p["b"].dtype)
            folded += 1
        pad = rank - ranks[module]
        if pad:
            a = mx.concatenate([a, mx.zeros((a.shape[0], pad), dtype=a.dtype)], axis=1)
            b = mx.concatenate([b, mx.zeros((pad, b.shape[1]), dtype=b.dtype)], axis=0)
        out[f"{module}.lora_a"] = a
        out[f"{module}.lora_b"] = b
    num_layers, keys = _mlx_layout(src, list(pairs), model, s.base_model, out)
    mx.save_safetensors(str(dst / MLX_WEIGHTS), out, metadata={"format": "mlx"})
    mlx_config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": s.dropout or 0.0, "keys": keys},
        "model": s.base_model,
        "converted_from": "peft",
    }
    (dst / CONFIG_FILE).write_text(json.dumps(mlx_config, indent=4) + "\n")
    return ConversionResult(src, dst, "peft", "mlx", len(pairs), rank, scale, num_layers, folded)


def _mlx_layout(
    src: Path, modules: list[str], model: str | Path | None, recorded: str | None, out: dict[str, mx.array]
) -> tuple[int, list[str]]:
    """num_layers and keys for mlx-lm; zeros fill the blocks the PEFT adapter skips (changing nothing)."""
    import mlx.core as mx

    layered = [(s, m) for m in modules if (s := split_layer(m))]
    keys = sorted({s[2] for s, _ in layered} | {m for m in modules if not split_layer(m)})
    if not layered:
        return -1, keys
    prefix = layered[0][0][0]
    lowest = min(s[1] for s, _ in layered)
    highest = max(s[1] for s, _ in layered)
    blocks = _block_count(model, recorded)
    if blocks is None:
        if lowest != 0:
            raise UsageError(
                f"{src} adapts blocks {lowest}-{highest} only; mlx-lm needs the base's number of blocks",
                "pass --model with the base model",
            )
        blocks = highest + 1
    if highest >= blocks:
        raise AdapterError(f"{src} adapts block {highest} but the base has {blocks} blocks", "check --model")
    shapes = {s[2]: (out[f"{m}.lora_a"], out[f"{m}.lora_b"]) for s, m in layered}
    for index in range(lowest, blocks):
        for key, (a, b) in shapes.items():
            name = f"{prefix}.{index}.{key}"
            if f"{name}.lora_a" not in out:
                out[f"{name}.lora_a"] = mx.zeros(a.shape, dtype=a.dtype)
                out[f"{name}.lora_b"] = mx.zeros(b.shape, dtype=b.dtype)
    return (-1 if lowest == 0 else blocks - lowest), keys


def _block_count(model: str | Path | None, recorded: str | None) -> int | None:
    from mlxman.errors import MlxmanError
    from mlxman.models.resolve import resolve_model

    for spec in (model, recorded):
        if not spec:
            continue
        try:
            return read_base(resolve_model(str(spec)).path).num_blocks or None
        except MlxmanError:
            if spec == model:
                raise
    return None


def _mlx_to_peft(src: Path, dst: Path, config: dict[str, Any], report: ValidationReport) -> ConversionResult:
    import mlx.core as mx

    s = check_config(config, "mlx", ValidationReport(adapter_dir=src))
    if s.fine_tune_type != "lora":
        raise AdapterError(
            f"Cannot convert a {s.fine_tune_type} adapter to PEFT faithfully", "only LoRA adapters convert"
        )
    assert s.rank is not None and s.scale is not None
    weights = _load(src / MLX_WEIGHTS)
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        module, _, leaf = name.rpartition(".")
        if value.ndim != 2:
            raise AdapterError(
                f"{name} is a {value.ndim}-D (mixture-of-experts) LoRA, which PEFT cannot hold"
            )
        peft_leaf = "lora_A" if leaf == "lora_a" else "lora_B"
        out[f"{PEFT_PREFIX}{module}.{peft_leaf}.weight"] = value.T
    layers, targets = layers_and_targets(name.rpartition(".")[0] for name in weights)
    mx.save_safetensors(str(dst / PEFT_WEIGHTS), out, metadata={"format": "pt"})
    alpha = s.scale * s.rank
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": s.base_model,
        "r": s.rank,
        "lora_alpha": alpha,
        "lora_dropout": s.dropout or 0.0,
        "target_modules": sorted(targets),
        "layers_to_transform": sorted(layers) or None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if alpha / s.rank != s.scale:
        raise AdapterError(
            f"scale {s.scale} times rank {s.rank} is not exact in floating point",
            "round the scale, or use the adapter with mlx-lm",
        )
    (dst / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return ConversionResult(src, dst, "mlx", "peft", len(out) // 2, s.rank, s.scale, s.num_layers, 0)
