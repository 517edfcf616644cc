"""Arbitrary bytes and JSON thrown at the safetensors header reader and the adapter config parser."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxman.adapters.config import check_config, parse_config
from mlxman.adapters.findings import ValidationReport
from mlxman.adapters.formats import detect_format
from mlxman.adapters.validate import validate_adapter
from mlxman.safetensors_header import HeaderError, read_header

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(["dtype", "shape", "data_offsets", "fine_tune_type", "num_layers", "lora_parameters",
                         "rank", "scale", "alpha", "dropout", "keys", "peft_type", "r", "lora_alpha",
                         "rank_pattern", "alpha_pattern", "modules_to_save", "use_dora", "bias"])  # fmt: skip
configs = st.dictionaries(names | st.text(max_size=6), json_values, max_size=8)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write(data: bytes) -> Path:
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(data)
    return Path(f.name)


@FUZZ
@given(st.binary(max_size=300))
def test_read_header_on_arbitrary_bytes(data: bytes) -> None:
    path = _write(data)
    try:
        read_header(path)
    except HeaderError as exc:
        assert str(exc)
    finally:
        path.unlink()


@FUZZ
@given(
    st.dictionaries(st.text(max_size=10), json_values, max_size=6), st.binary(max_size=64), st.integers(0, 64)
)
def test_read_header_on_arbitrary_json(doc: dict[str, Any], body: bytes, slack: int) -> None:
    raw = json.dumps(doc).encode()
    path = _write(struct.pack("<Q", len(raw) + slack) + raw + body)
    try:
        header = read_header(path)
        for t in header.tensors.values():
            assert 0 <= t.start <= t.end <= header.file_size
    except HeaderError as exc:
        assert str(exc)
    finally:
        path.unlink()


@FUZZ
@given(st.binary(max_size=200))
def test_parse_config_on_arbitrary_bytes(data: bytes) -> None:
    try:
        assert isinstance(parse_config(data), dict)
    except ValueError as exc:
        assert str(exc)


@FUZZ
@given(configs, st.sampled_from(["mlx", "peft", "mlx-vlm", "unknown"]))
def test_check_config_on_arbitrary_json(config: dict[str, Any], fmt: Any) -> None:
    report = ValidationReport(adapter_dir=Path("x"))
    settings_ = check_config(config, fmt, report)
    assert settings_.format == fmt
    detect_format(config, set())


@FUZZ
@given(configs | st.lists(json_values), st.binary(max_size=120))
def test_validate_adapter_never_raises(config: Any, weights: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "adapter_config.json").write_text(json.dumps(config))
        (Path(d) / "adapters.safetensors").write_bytes(weights)
        report = validate_adapter(d)
        assert not report.ok or report.findings is not None
