"""Read adapter_config.json defensively and check its values, for mlx-lm, PEFT and mlx-vlm adapters."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.adapters.findings import AdapterFormat, ValidationReport
from mlxman.adapters.formats import CONFIG_FILE, FINE_TUNE_TYPES
from mlxman.errors import AdapterError, NotFoundError
from mlxman.files import (
    ADAPTER_CONFIG_MAX_BYTES,
    MISSING,
    parse_json_object,
    path_problem,
    shown_path,
    too_long,
)
from mlxman.files import FileProblem as FileProblem
from mlxman.files import check_regular_file as check_regular_file
from mlxman.files import read_bounded as _read_bounded

# The bounded readers live in mlxman.files; these names stay for the adapter package's callers.
MAX_CONFIG_BYTES = ADAPTER_CONFIG_MAX_BYTES
PEFT_BIAS_VALUES = ("none", "all", "lora_only")


def read_bounded(path: Path, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """A small config file's bytes (see ``mlxman.files.read_bounded``)."""
    return _read_bounded(path, limit, "an adapter config")


def parse_config(raw: bytes) -> dict[str, Any]:
    """Decode a config's bytes into a JSON object; raise ValueError in plain words otherwise."""
    return parse_json_object(raw)


def read_adapter_config(adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The adapter's ``adapter_config.json`` as a dict; NotFoundError or AdapterError when it cannot be."""
    path = Path(adapter_dir) / CONFIG_FILE
    problem = path_problem(Path(adapter_dir), want_dir=True)
    if problem:
        # Nothing there is "does not exist"; a loop, a FIFO or a file is named for what it is.
        gone = problem in (MISSING, "is a dangling symlink") or too_long(problem)
        words = "does not exist" if problem == MISSING else problem
        raise (NotFoundError if gone else AdapterError)(
            f"Adapter directory {shown_path(adapter_dir)} {words}",
            "pass the folder of an adapter",
        )
    try:
        return parse_config(read_bounded(path))
    except FileProblem as exc:
        raise AdapterError(f"Adapter {adapter_dir}: {exc}", "run `mlxman adapter validate` on it") from None
    except ValueError as exc:
        raise AdapterError(
            f"Adapter {adapter_dir}: {CONFIG_FILE} {exc}", "fix or regenerate the file"
        ) from None


@dataclass
class AdapterSettings:
    """The settings that decide how an adapter applies, normalised across formats."""

    format: AdapterFormat
    fine_tune_type: str = "lora"
    rank: int | None = None
    scale: float | None = None
    alpha: float | None = None
    dropout: float | None = None
    num_layers: int | None = None
    keys: list[str] | None = None
    base_model: str | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    bias: str = "none"
    target_modules: list[str] | str | None = None

    def module_rank_alpha(self, module: str) -> tuple[int | None, float | None]:
        """PEFT's per-module rank and alpha: the first pattern whose regex matches the module's name."""
        return (
            _pattern_value(self.rank_pattern, module, self.rank),
            _pattern_value(self.alpha_pattern, module, self.alpha),
        )

    def module_scale(self, module: str) -> float | None:
        if self.format != "peft":
            return self.scale
        rank, alpha = self.module_rank_alpha(module)
        if rank is None or alpha is None or rank <= 0:
            return None
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?(?:{key})$", module):
                return value
        except re.error:
            continue
    return default


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Checker:
    """Collects config findings against one report, naming each key as ``adapter_config.json: key``."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report

    def where(self, key: str) -> str:
        return f"{CONFIG_FILE}: {key}"

    def rank(self, key: str, value: Any, required: bool = True) -> int | None:
        if value is None:
            if required:
                self.report.error(
                    self.where(key), "is missing", "set the LoRA rank the adapter was trained with"
                )
            return None
        if not _is_int(value) or value <= 0:
            self.report.error(
                self.where(key), f"must be a positive integer, not {value!r}", "set the LoRA rank"
            )
            return None
        return int(value)

    def finite(self, key: str, value: Any, what: str) -> float | None:
        if not _is_number(value) or not math.isfinite(value):
            self.report.error(self.where(key), f"must be a finite number, not {value!r}", f"set the {what}")
            return None
        return float(value)

    def dropout(self, key: str, value: Any, required: bool) -> float | None:
        if value is None:
            if required:
                self.report.error(
                    self.where(key), "is missing (mlx-lm needs it to wrap layers)", 'add "dropout": 0.0'
                )
            return None
        if not _is_number(value) or not 0 <= value < 1:
            self.report.error(self.where(key), f"must be a number in [0, 1), not {value!r}", "set it to 0.0")
            return None
        return float(value)

    def string_list(self, key: str, value: Any) -> list[str] | None:
        if not isinstance(value, list) or not all(isinstance(k, str) and k for k in value):
            self.report.error(self.where(key), f"must be a list of module names, not {_short(value)}")
            return None
        return list(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config(config: dict[str, Any], fmt: AdapterFormat, report: ValidationReport) -> AdapterSettings:
    """Check the config's types and values, adding findings; return what could be read."""
    if fmt == "peft":
        return _check_peft(config, report)
    if fmt == "mlx-vlm" and "lora_parameters" not in config and "fine_tune_type" not in config:
        return _check_vlm_legacy(config, report)
    return _check_mlx(config, fmt, report)


def _check_mlx(config: dict[str, Any], fmt: AdapterFormat, report: ValidationReport) -> AdapterSettings:
    c = _Checker(report)
    s = AdapterSettings(format=fmt)
    ftt = config.get("fine_tune_type", "lora")
    if ftt not in FINE_TUNE_TYPES:
        report.error(
            c.where("fine_tune_type"),
            f"{_short(ftt)} is not a fine-tune type mlx-lm knows; it would silently apply it as LoRA",
            f"use one of {', '.join(FINE_TUNE_TYPES)}",
        )
        ftt = "lora"
    s.fine_tune_type = str(ftt)
    num_layers = config.get("num_layers")
    if num_layers is None:
        if fmt == "mlx":
            # Older mlx-lm wrote the same setting as lora_layers; today's mlx-lm reads only num_layers.
            old = config.get("lora_layers")
            hint = f'rename "lora_layers" to "num_layers" ({old!r})' if _is_int(old) else "set it, -1 for all"
            report.error(c.where("num_layers"), "is missing (mlx-lm fails to load without it)", hint)
    elif not _is_int(num_layers):
        report.error(
            c.where("num_layers"), f"must be an integer, not {_short(num_layers)}", "set it, -1 for all"
        )
    else:
        s.num_layers = int(num_layers)
    base = config.get("model")
    if base is not None and not isinstance(base, str):
        report.warning(c.where("model"), f"should name the base model, not {_short(base)}")
    s.base_model = base if isinstance(base, str) else None
    if s.fine_tune_type == "full":
        return s
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        what = "is missing" if params is None else f"must be an object, not {_short(params)}"
        report.error(c.where("lora_parameters"), what, 'add {"rank": 8, "scale": 20.0, "dropout": 0.0}')
        return s
    s.rank = c.rank("lora_parameters.rank", params.get("rank"))
    if "scale" in params:
        s.scale = c.finite("lora_parameters.scale", params["scale"], "LoRA scale")
    elif "alpha" in params:
        report.error(
            c.where("lora_parameters.scale"),
            "is missing; the config has 'alpha', which mlx-lm does not read (it wants scale = alpha / rank)",
            "replace alpha by scale = alpha / rank",
        )
    else:
        report.error(c.where("lora_parameters.scale"), "is missing", "set the LoRA scale, e.g. 20.0")
    s.dropout = c.dropout("lora_parameters.dropout", params.get("dropout"), required=fmt == "mlx")
    if "keys" in params and params["keys"] is not None:
        s.keys = c.string_list("lora_parameters.keys", params["keys"])
    return s


def _check_vlm_legacy(config: dict[str, Any], report: ValidationReport) -> AdapterSettings:
    c = _Checker(report)
    s = AdapterSettings(format="mlx-vlm")
    s.rank = c.rank("rank", config.get("rank"))
    s.alpha = c.finite("alpha", config.get("alpha", 0.1), "LoRA alpha")
    if s.rank and s.alpha is not None:
        s.scale = s.alpha / s.rank
    s.dropout = c.dropout("dropout", config.get("dropout"), required=False)
    return s


def _check_peft(config: dict[str, Any], report: ValidationReport) -> AdapterSettings:
    c = _Checker(report)
    s = AdapterSettings(format="peft")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        report.error(
            c.where("peft_type"), f"{_short(peft_type)} is not LoRA; only LoRA adapters are supported"
        )
    s.rank = c.rank("r", config.get("r", 8))
    s.alpha = c.finite("lora_alpha", config.get("lora_alpha", 8), "LoRA alpha")
    s.dropout = c.dropout("lora_dropout", config.get("lora_dropout", 0.0), required=False)
    for flag in ("use_rslora", "use_dora"):
        if not isinstance(config.get(flag, False), bool):
            report.error(c.where(flag), f"must be true or false, not {_short(config.get(flag))}")
    s.use_rslora = config.get("use_rslora") is True
    if config.get("use_dora") is True:
        s.fine_tune_type = "dora"
    for key, cast in (("rank_pattern", "rank"), ("alpha_pattern", "alpha")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            report.error(c.where(key), f"must be an object mapping module names to a {cast}")
            continue
        good: dict[str, Any] = {}
        for name, value in pattern.items():
            ok = (
                (_is_int(value) and value > 0)
                if cast == "rank"
                else (_is_number(value) and math.isfinite(value))
            )
            if not ok:
                report.error(
                    c.where(f"{key}.{name}"),
                    f"must be a {'positive integer' if cast == 'rank' else 'finite number'}",
                )
                continue
            try:
                re.compile(name)
            except re.error:
                report.error(c.where(f"{key}.{name}"), "is not a valid module pattern")
                continue
            good[name] = value
        if cast == "rank":
            s.rank_pattern = good
        else:
            s.alpha_pattern = good
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        s.target_modules = c.string_list("target_modules", targets)
    else:
        s.target_modules = targets
    mts = config.get("modules_to_save")
    if mts is not None:
        s.modules_to_save = c.string_list("modules_to_save", mts) or []
    bias = config.get("bias", "none")
    if bias not in PEFT_BIAS_VALUES:
        report.error(c.where("bias"), f"must be one of {', '.join(PEFT_BIAS_VALUES)}, not {_short(bias)}")
    else:
        s.bias = str(bias)
    base = config.get("base_model_name_or_path")
    s.base_model = base if isinstance(base, str) and base else None
    return s
