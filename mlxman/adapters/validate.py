"""Header-only adapter validation: every problem found at once, without loading a weight or mlx-lm."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxman.adapters.base import BaseModel, read_base, split_layer
from mlxman.adapters.config import (
    AdapterSettings,
    FileProblem,
    check_config,
    check_regular_file,
    parse_config,
    read_adapter_config,
    read_bounded,
)
from mlxman.adapters.findings import ValidationReport
from mlxman.adapters.formats import (
    CONFIG_FILE,
    FORMAT_NAMES,
    MLX_WEIGHTS,
    PEFT_PICKLE,
    PEFT_PREFIX,
    PEFT_WEIGHTS,
    detect_format,
    weights_file,
)
from mlxman.errors import MlxmanError
from mlxman.files import MISSING, exists, path_problem, shown_path
from mlxman.safetensors_header import HeaderError, TensorInfo, read_header

__all__ = ["AdapterModule", "read_adapter_config", "validate_adapter"]

ADAPTER_DTYPES = ("F32", "F16", "BF16")
# How many names one finding lists before it says "and N more".
MAX_LISTED = 6


@dataclass
class AdapterModule:
    """The tensors of one adapted module, named the way mlx-lm names the module (PEFT prefix stripped)."""

    path: str
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    m: TensorInfo | None = None
    embedding: bool = False

    def dims(self, fmt: str) -> tuple[int | None, int | None, int | None, int | None]:
        """(in, out, rank of A, rank of B) in mlx-lm's orientation, whatever the file's."""
        a, b = (self.a.shape if self.a else ()), (self.b.shape if self.b else ())
        in_dims = out_dims = ra = rb = None
        if fmt == "peft":
            if len(a) == 2:
                ra, in_dims = a
            if len(b) == 2:
                out_dims, rb = b
        else:
            if len(a) == 2:
                in_dims, ra = a
            elif len(a) == 3:
                ra, in_dims = a[1], a[2]
            if len(b) == 2:
                rb, out_dims = b
            elif len(b) == 3:
                out_dims, rb = b[1], b[2]
        return in_dims, out_dims, ra, rb


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts: list[str] = []
    for i in sorted(indices):
        if parts and parts[-1].split("-")[-1] == str(i - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{i}"
        else:
            parts.append(str(i))
    return ", ".join(parts)


def _blocks(indices: list[int]) -> str:
    return f"block{'s' if len(indices) > 1 else ''} {_ranges(indices)}"


def validate_adapter(adapter_dir: str | Path, model_dir: str | Path | None = None) -> ValidationReport:
    """Check an adapter (and its fit to ``model_dir``) from JSON and headers; never raises on bad input."""
    adapter_dir = Path(adapter_dir)
    report = ValidationReport(adapter_dir=adapter_dir, model_dir=Path(model_dir) if model_dir else None)
    try:
        _validate(report, adapter_dir, Path(model_dir) if model_dir else None)
    except RecursionError:
        report.error(str(adapter_dir), "is nested too deeply to check", "this is not an adapter")
    return report


def _validate(report: ValidationReport, adapter_dir: Path, model_dir: Path | None) -> None:
    try:
        problem = path_problem(adapter_dir, want_dir=True)
        if problem is not None:
            what = "does not exist" if problem == MISSING else problem
            what = what.replace("is a file, not a folder", "is a file, not an adapter directory")
            report.error(shown_path(adapter_dir), what, "pass the folder holding adapter_config.json")
            return
        files = set(os.listdir(adapter_dir))
    except OSError as exc:
        report.error(str(adapter_dir), f"cannot be listed: {exc.strerror or exc}", "check its permissions")
        return
    config = _load_config(report, adapter_dir)
    fmt = detect_format(config, files)
    report.format = fmt
    if config is None and fmt == "unknown":
        return
    settings = check_config(config, fmt, report) if config is not None else AdapterSettings(format=fmt)
    report.fine_tune_type = settings.fine_tune_type
    modules, extras = _load_tensors(report, adapter_dir, files, settings)
    if modules is None:
        return
    if fmt == "peft":
        _peft_notes(report, settings, extras)
    _check_modules(report, settings, modules, extras)
    base = _load_base(report, model_dir) if model_dir is not None else None
    if base is not None:
        _check_against_base(report, settings, modules, extras, base)
        _check_base_name(report, settings, base, model_dir)
    _check_coverage(report, settings, modules, base)


def _load_config(report: ValidationReport, adapter_dir: Path) -> dict[str, Any] | None:
    try:
        return parse_config(read_bounded(adapter_dir / CONFIG_FILE))
    except FileProblem as exc:
        hint = "add the adapter_config.json written at training time" if "missing" in str(exc) else ""
        report.error(
            CONFIG_FILE, str(exc).removeprefix(f"{CONFIG_FILE} "), hint or "replace it with the real file"
        )
    except ValueError as exc:
        report.error(CONFIG_FILE, str(exc), "fix the file or regenerate it")
    return None


def _load_tensors(
    report: ValidationReport, adapter_dir: Path, files: set[str], settings: AdapterSettings
) -> tuple[dict[str, AdapterModule] | None, dict[str, TensorInfo]]:
    """Group the weight file's tensors by module; ``extras`` are tensors that are no adapter parameter."""
    fmt = settings.format
    name = weights_file(fmt, files)
    path = adapter_dir / name
    if fmt == "peft" and name not in files and PEFT_PICKLE in files:
        report.error(
            PEFT_PICKLE,
            "holds pickled weights, which mlxman never unpickles (it can run arbitrary code)",
            "save the adapter with safe_serialization=True (adapter_model.safetensors)",
        )
        return None, {}
    try:
        check_regular_file(path)
        header = read_header(path)
    except FileProblem as exc:
        hint = "copy the adapter's weights file into the folder"
        checkpoints = sorted(f for f in files if f.endswith("_" + MLX_WEIGHTS))
        if "missing" in str(exc) and checkpoints:
            hint = f"copy the last checkpoint {checkpoints[-1]} to {MLX_WEIGHTS}"
        report.error(name, str(exc).removeprefix(f"{name} "), hint)
        return None, {}
    except HeaderError as exc:
        report.error(
            name, str(exc).removeprefix(f"{name}: ").removeprefix(f"{name} "), "re-save or re-download it"
        )
        return None, {}
    if not header.tensors:
        report.error(name, "holds no tensors", "train or download the adapter again")
        return None, {}
    modules: dict[str, AdapterModule] = {}
    extras: dict[str, TensorInfo] = {}
    for tname, info in header.tensors.items():
        parsed = _parse_name(tname, settings)
        if parsed is None:
            extras[tname] = info
            continue
        path_, role, embedding = parsed
        mod = modules.setdefault(path_, AdapterModule(path_))
        mod.embedding = mod.embedding or embedding
        setattr(mod, role, info)
    return modules, extras


def _parse_name(name: str, s: AdapterSettings) -> tuple[str, str, bool] | None:
    """(module path, role a|b|m, is embedding) of an adapter tensor, or None for anything else."""
    if s.fine_tune_type == "full" and s.format != "peft":
        return None
    if s.format == "peft":
        if not name.startswith(PEFT_PREFIX):
            return None
        rest = name[len(PEFT_PREFIX) :]
        for suffix, role, emb in (
            (".lora_A.weight", "a", False),
            (".lora_B.weight", "b", False),
            (".lora_embedding_A", "a", True),
            (".lora_embedding_B", "b", True),
            (".lora_magnitude_vector", "m", False),
            (".lora_magnitude_vector.weight", "m", False),
        ):
            if rest.endswith(suffix):
                return rest[: -len(suffix)], role, emb
        return None
    module, _, leaf = name.rpartition(".")
    roles = {"lora_a": "a", "lora_b": "b", "m": "m", "A": "a", "B": "b"}
    if not module or leaf not in roles:
        return None
    return module, roles[leaf], False


def _peft_notes(report: ValidationReport, s: AdapterSettings, extras: dict[str, TensorInfo]) -> None:
    report.warning(
        "format",
        "this is a Hugging Face PEFT adapter, which mlx-lm cannot load as is",
        "convert it with `mlxman adapter convert SRC DST --to mlx`",
    )
    if s.fine_tune_type == "dora":
        report.warning(
            f"{CONFIG_FILE}: use_dora", "PEFT DoRA adapters cannot be converted to mlx-lm faithfully"
        )
    if s.modules_to_save:
        report.warning(
            f"{CONFIG_FILE}: modules_to_save",
            f"carries whole modules ({_listing(s.modules_to_save)}), which mlx-lm adapters cannot",
        )
    biases = sorted(n for n in extras if n.endswith(".bias"))
    if biases:
        report.warning(
            PEFT_WEIGHTS, f"holds trained biases ({_listing(biases)}), which mlx-lm adapters cannot"
        )


def _check_modules(
    report: ValidationReport,
    s: AdapterSettings,
    modules: dict[str, AdapterModule],
    extras: dict[str, TensorInfo],
) -> None:
    wfile = PEFT_WEIGHTS if s.format == "peft" else MLX_WEIGHTS
    dtypes: set[str] = set()
    for info in [*extras.values(), *(t for m in modules.values() for t in (m.a, m.b, m.m) if t)]:
        dtypes.add(info.dtype)
        if info.dtype not in ADAPTER_DTYPES and not (s.fine_tune_type == "full" and s.format != "peft"):
            report.error(
                f"{wfile}: {info.name}",
                f"has dtype {info.dtype}; adapter weights must be float32, float16 or bfloat16",
                "re-save the adapter in a float dtype",
            )
    if len(dtypes & set(ADAPTER_DTYPES)) > 1:
        report.warning(wfile, f"mixes dtypes {', '.join(sorted(dtypes))}", "save every tensor in one dtype")
    if s.fine_tune_type == "full" and s.format != "peft":
        lora = sorted(n for n in extras if n.rsplit(".", 1)[-1] in ("lora_a", "lora_b"))
        if lora:
            report.error(
                wfile,
                f"holds LoRA tensors ({_listing(lora)}) but fine_tune_type is 'full'",
                "set fine_tune_type to 'lora' or 'dora'",
            )
        return
    unknown = sorted(
        n for n in extras if not (s.format == "peft" and (n.endswith(".bias") or s.modules_to_save))
    )
    for name in unknown:
        report.error(
            f"{wfile}: {name}",
            f"is not a parameter of a {s.fine_tune_type.upper()} adapter in {FORMAT_NAMES[s.format]} format",
            "remove it, or fix fine_tune_type" if s.format != "peft" else "remove it",
        )
    for mod in modules.values():
        _check_pair(report, s, mod, wfile)


def _check_pair(report: ValidationReport, s: AdapterSettings, mod: AdapterModule, wfile: str) -> None:
    where = f"{wfile}: {mod.path}"
    a_name, b_name = ("lora_A", "lora_B") if s.format == "peft" else ("lora_a", "lora_b")
    if mod.a is None or mod.b is None:
        missing = a_name if mod.a is None else b_name
        present = b_name if mod.a is None else a_name
        report.error(where, f"has {present} but no {missing}", "the file is incomplete: re-save the adapter")
        return
    if s.fine_tune_type == "dora" and s.format != "peft" and mod.m is None:
        report.error(
            where, "has no DoRA magnitude '.m'", "re-save the adapter, or set fine_tune_type to 'lora'"
        )
    if s.fine_tune_type != "dora" and mod.m is not None:
        report.error(
            where, "has a DoRA magnitude but fine_tune_type is not 'dora'", "set fine_tune_type to 'dora'"
        )
    expected_ndim = 2 if s.format == "peft" else len(mod.a.shape)
    if (
        len(mod.a.shape) not in (2, 3)
        or len(mod.b.shape) != len(mod.a.shape)
        or len(mod.a.shape) != expected_ndim
    ):
        report.error(
            where, f"{a_name} {mod.a.shape} and {b_name} {mod.b.shape} are not a LoRA pair of matrices"
        )
        return
    _, out_dims, ra, rb = mod.dims(s.format)
    if ra != rb:
        report.error(
            where,
            f"{a_name} {mod.a.shape} and {b_name} {mod.b.shape} disagree on the rank ({ra} vs {rb})",
            "the tensors come from different adapters",
        )
        return
    rank = s.module_rank_alpha(mod.path)[0] if s.format == "peft" else s.rank
    if rank is not None and ra != rank:
        key = "r (or rank_pattern)" if s.format == "peft" else "lora_parameters.rank"
        report.error(where, f"has rank {ra} but the config declares {key} {rank}", f"set {key} to {ra}")
    if len(mod.a.shape) == 3 and mod.a.shape[0] != mod.b.shape[0]:
        report.error(where, f"{a_name} and {b_name} disagree on the number of experts")
    if mod.m is not None and mod.m.shape != (out_dims,):
        report.error(where, f"DoRA magnitude has shape {mod.m.shape}, expected ({out_dims},)")


def _load_base(report: ValidationReport, model_dir: Path) -> BaseModel | None:
    from mlxman.models.resolve import resolve_model

    try:
        resolved = resolve_model(str(model_dir))
        base = read_base(resolved.path)
    except MlxmanError as exc:
        report.error("model", exc.message, exc.hint or "")
        return None
    for problem in base.problems:
        report.error("model", problem, "check the base model's files")
    return base


def _check_against_base(
    report: ValidationReport,
    s: AdapterSettings,
    modules: dict[str, AdapterModule],
    extras: dict[str, TensorInfo],
    base: BaseModel,
) -> None:
    wfile = PEFT_WEIGHTS if s.format == "peft" else MLX_WEIGHTS
    if s.fine_tune_type == "full" and s.format != "peft":
        for name, info in sorted(extras.items()):
            theirs = base.tensors.get(name)
            if theirs is None:
                report.error(f"{wfile}: {name}", "is not a weight of the base model", "check --model")
            elif theirs.shape != info.shape:
                report.error(f"{wfile}: {name}", f"has shape {info.shape} but the base's is {theirs.shape}")
            _check_window(report, s, base, name, wfile)
        return
    for mod in sorted(modules.values(), key=lambda m: m.path):
        where = f"{wfile}: {mod.path}"
        target = base.modules.get(mod.path)
        split = split_layer(mod.path)
        if target is None and split and base.num_blocks and split[1] >= base.num_blocks:
            _check_window(report, s, base, mod.path, wfile)
            continue
        if target is None:
            report.error(
                where, "targets a module the base model does not have", "check --model or the tensor names"
            )
            continue
        _check_window(report, s, base, mod.path, wfile)
        if mod.a is None or mod.b is None:
            continue
        in_dims, out_dims, _, _ = mod.dims(s.format)
        quant = f" ({target.bits}-bit, unpacked)" if target.bits else ""
        if in_dims != target.in_dims:
            report.error(
                where,
                f"expects input size {in_dims} but the base module takes {target.in_dims}{quant}",
                "the adapter was trained on a different base model",
            )
        if out_dims != target.out_dims:
            report.error(
                where,
                f"produces output size {out_dims} but the base module gives {target.out_dims}",
                "the adapter was trained on a different base model",
            )
    base_dtype = base.float_dtype
    ours = {t.dtype for m in modules.values() for t in (m.a, m.b) if t is not None}
    if base_dtype and ours and ours != {base_dtype}:
        report.warning(
            wfile,
            f"is {'/'.join(sorted(ours))} but the base model is {base_dtype}",
            "fine for inference; save the adapter in the base's dtype for exact results",
        )


def _window(s: AdapterSettings, blocks: int) -> range:
    """The blocks mlx-lm wraps: the last ``num_layers`` (all of them for -1, 0 or too many)."""
    n = s.num_layers if s.format != "peft" else None
    if n is None or n <= 0 or n > blocks:
        return range(blocks)
    return range(blocks - n, blocks)


def _check_window(
    report: ValidationReport, s: AdapterSettings, base: BaseModel, path: str, wfile: str
) -> None:
    split = split_layer(path)
    if split is None or not base.num_blocks:
        return
    index = split[1]
    if index >= base.num_blocks:
        report.error(
            f"{wfile}: {path}",
            f"is for block {index} but the base model has {base.num_blocks} blocks",
            "the adapter was trained on a different base model",
        )
    elif index not in _window(s, base.num_blocks):
        w = _window(s, base.num_blocks)
        report.error(
            f"{wfile}: {path}",
            f"is for block {index}, outside the last num_layers={s.num_layers} blocks "
            f"({w.start}-{w.stop - 1}) that mlx-lm wraps",
            "raise num_layers in adapter_config.json to cover it",
        )


def _check_base_name(
    report: ValidationReport, s: AdapterSettings, base: BaseModel, model_dir: Path | None
) -> None:
    recorded = s.base_model
    if not recorded or model_dir is None:
        return
    given = str(model_dir)
    if recorded == given:
        return
    rec_path = Path(recorded).expanduser()
    if rec_path.is_absolute() or exists(rec_path):
        try:
            if rec_path.resolve() == base.path.resolve():
                return
        except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, a NUL: not this base
            pass
    names = {base.path.name, base.path.resolve().name, given.rstrip("/").rsplit("/", 1)[-1]}
    if recorded.rstrip("/").rsplit("/", 1)[-1] in names or recorded in (base.config.get("_name_or_path"),):
        return
    # A Hugging Face id is checked against its snapshot in the cache: models--ORG--NAME/snapshots/COMMIT.
    if "models--" + recorded.split("@", 1)[0].replace("/", "--") in base.path.parts:
        return
    key = "base_model_name_or_path" if s.format == "peft" else "model"
    report.warning(
        f"{CONFIG_FILE}: {key}",
        f"the adapter records base '{recorded}', not '{given}'",
        "check that this is the base it was trained on; equal shapes do not make it the same model",
    )


def _check_coverage(
    report: ValidationReport, s: AdapterSettings, modules: dict[str, AdapterModule], base: BaseModel | None
) -> None:
    """An adapter that covers only part of its declared layers or keys fails silently in mlx-lm: flag it."""
    if s.format == "peft" or s.fine_tune_type == "full" or not modules:
        return
    by_layer: dict[int, set[str]] = {}
    top_level: set[str] = set()
    prefix = ""
    for path in modules:
        split = split_layer(path)
        if split is None:
            top_level.add(path)
            continue
        prefix, index, rest = split
        by_layer.setdefault(index, set()).add(rest)
    if s.keys is not None and s.format == "mlx":
        stray = sorted(
            p for p in modules if (split_layer(p) or ("", 0, p))[2] not in s.keys and p not in s.keys
        )
        if stray:
            report.error(
                f"{CONFIG_FILE}: lora_parameters.keys",
                f"does not list the modules of {_listing(stray)}; mlx-lm would reject those tensors",
                "add their module names to keys",
            )
    if not by_layer:
        return
    covered = sorted(by_layer)
    if base is not None and base.num_blocks:
        declared = list(_window(s, base.num_blocks))
    elif s.num_layers is not None and s.num_layers > 0:
        # Without the base, its last block is the last one with tensors; mlx-lm wraps the last num_layers
        # blocks, every block when the base has fewer (a 16-block setting trained on a 2-block model).
        declared = list(range(max(0, max(covered) - s.num_layers + 1), max(covered) + 1))
    else:
        declared = list(range(max(covered) + 1))
    if s.format == "mlx-vlm" and s.keys is not None:
        declared = covered  # mlx-vlm lists exact module paths; no block window applies
    missing = [i for i in declared if i not in by_layer]
    if missing and declared:
        report.error(
            "coverage",
            f"covers {_blocks(covered)} but mlx-lm would wrap {_blocks(declared)} "
            f"(num_layers={s.num_layers}); {_blocks(missing)} {'has' if len(missing) == 1 else 'have'} "
            "no tensors and would silently stay unadapted",
            "set num_layers to the number of blocks it covers, or re-save the complete adapter",
        )
    if base is None and s.num_layers is not None and s.num_layers > 0 and len(covered) > s.num_layers:
        report.error(
            "coverage",
            f"has tensors for {len(covered)} blocks but num_layers is {s.num_layers}",
            "raise num_layers to cover every block it has tensors for",
        )
    keys = set().union(*by_layer.values())
    if s.keys is None and base is not None and s.format == "mlx":
        # Without keys mlx-lm wraps every linear and embedding of a block: each one needs its tensors.
        keys |= {
            split[2]
            for m in base.modules.values()
            if m.experts is None and (split := split_layer(m.path)) and split[0] == prefix
        }
    if s.keys is not None:
        keys |= {k for k in s.keys if k not in top_level}
        for key in sorted(k for k in s.keys if k not in keys and k not in top_level and base is None):
            report.warning(
                "coverage", f"key '{key}' has no tensors", "pass --model to check it against the base"
            )
    gaps: list[str] = []
    for index in declared:
        if index not in by_layer:
            continue
        for key in sorted(keys - by_layer[index]):
            if base is None or base.has_block_module(index, prefix, key):
                gaps.append(f"{prefix}.{index}.{key}")
    if base is not None and s.keys is not None:
        for key in sorted(set(s.keys) - keys - top_level):
            if any(base.has_block_module(i, prefix, key) for i in declared):
                gaps.append(f"{key} (every block)")
            elif key not in base.modules:
                report.warning("coverage", f"key '{key}' matches no module of the base; mlx-lm ignores it")
    if gaps:
        severity = report.error if base is not None else report.warning
        severity(
            "coverage",
            f"{len(gaps)} declared module(s) have no tensors and would silently stay unadapted: "
            f"{_listing(gaps)}",
            "re-save the complete adapter" if base is not None else "pass --model to check against the base",
        )
