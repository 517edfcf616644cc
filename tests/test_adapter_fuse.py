"""``mlxman adapter fuse``: a fused model answers exactly as base + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlxman.demo import DemoKit
from mlxman.demo.kit import greedy_answer
from tests.adapter_corpus import CASES, copy_adapter
from tests.helpers import run_cli


@pytest.mark.parametrize("name", ["colors", "animals"])
def test_fused_greedy_output_equals_base_plus_adapter(demo_kit: DemoKit, tmp_path: Path, name: str) -> None:
    out = tmp_path / "fused"
    adapter = demo_kit.adapters[name]
    result = run_cli(
        "adapter", "fuse", "--model", str(demo_kit.model), "--adapter", str(adapter), "--out", str(out)
    )
    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert greedy_answer(out, None) == greedy_answer(demo_kit.model, adapter)


def test_fuse_refuses_an_unsound_adapter(demo_kit: DemoKit, tmp_path: Path) -> None:
    bad = copy_adapter(demo_kit.adapters["colors"], tmp_path / "bad")
    next(c for c in CASES if c.name == "input_size_mismatch").defect(bad)
    out = tmp_path / "fused"
    result = run_cli(
        "adapter", "fuse", "--model", str(demo_kit.model), "--adapter", str(bad), "--out", str(out)
    )
    assert result.exit_code == 1
    assert "input size" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
