"""``mlxman adapter info``: what an adapter is, as a panel or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from mlxman.demo import DemoKit
from tests.helpers import run_cli


def test_info_json_on_demo_adapters(demo_kit: DemoKit) -> None:
    data = json.loads(run_cli("adapter", "info", str(demo_kit.adapters["animals"]), "--json").stdout)
    assert data["format"] == "mlx" and data["fine_tune_type"] == "dora"
    assert data["rank"] == 8 and data["scale"] > 0 and data["layers"] == [0, 1]
    assert "self_attn.q_proj" in data["target_modules"]
    assert data["parameters"] > 0 and data["bytes"] == data["parameters"] * 4 and data["dtypes"] == ["F32"]
    assert data["base_model"] and "learning_rate" in data["training"]


def test_info_panel_and_peft(demo_kit: DemoKit, tmp_path: Path) -> None:
    panel = run_cli("adapter", "info", str(demo_kit.adapters["colors"]))
    assert panel.exit_code == 0 and "lora" in panel.stdout and "Rank" in panel.stdout
    run_cli("adapter", "convert", str(demo_kit.adapters["colors"]), str(tmp_path / "p"), "--to", "peft")
    data = json.loads(run_cli("adapter", "info", str(tmp_path / "p"), "--json").stdout)
    assert data["format"] == "peft" and data["alpha"] == data["rank"] * data["scale"]


def test_info_errors(tmp_path: Path) -> None:
    assert run_cli("adapter", "info", str(tmp_path / "nope")).exit_code == 2
    (tmp_path / "adapter_config.json").write_text("{")
    result = run_cli("adapter", "info", str(tmp_path))
    assert result.exit_code == 1 and "not valid JSON" in result.stderr
