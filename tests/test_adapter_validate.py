"""``mlxman adapter validate`` on the demo kit's real adapters and a corpus of malformed ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mlxman.adapters.findings import Finding, ValidationReport
from mlxman.adapters.validate import read_adapter_config, validate_adapter
from mlxman.demo import DemoKit
from mlxman.errors import AdapterError, NotFoundError
from tests.adapter_corpus import CASES, Case, copy_adapter, edit_config
from tests.helpers import imported_heavy_modules, run_cli, run_subprocess


def _json(result) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(result.stdout)


@pytest.mark.parametrize("name", ["colors", "numbers", "animals"])
def test_demo_adapters_are_sound(demo_kit: DemoKit, name: str) -> None:
    for model in (None, demo_kit.model):
        report = validate_adapter(demo_kit.adapters[name], model)
        assert report.ok, report.summary()
        assert report.findings == []
        assert report.format == "mlx"
        assert report.fine_tune_type == ("dora" if name == "animals" else "lora")


def test_validate_cli_sound_exit_0(demo_kit: DemoKit) -> None:
    result = run_cli("adapter", "validate", str(demo_kit.adapters["colors"]), "--model", str(demo_kit.model))
    assert result.exit_code == 0
    assert "sound" in result.stdout
    data = _json(run_cli("adapter", "validate", str(demo_kit.adapters["animals"]), "--json"))
    assert data["ok"] is True and data["format"] == "mlx" and data["fine_tune_type"] == "dora"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_adapter(case: Case, demo_kit: DemoKit, tmp_path: Path) -> None:
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    adapter = copy_adapter(demo_kit.adapters[case.source], tmp_path / case.name)
    case.defect(adapter)
    args = ["adapter", "validate", str(adapter), "--json"]
    if case.with_model:
        args += ["--model", str(demo_kit.model)]
    result = run_cli(*args)
    assert result.exit_code == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    data = _json(result)
    assert data["ok"] is False
    errors = [
        f"{f['where']}: {f['message']} ({f['hint']})" for f in data["findings"] if f["severity"] == "error"
    ]
    assert any(case.culprit in e for e in errors), errors
    # The plain rendering names it too.
    plain = run_cli(*[a for a in args if a != "--json"])
    assert plain.exit_code == 1 and case.culprit in " ".join(plain.stdout.split())


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)


def test_all_findings_reported_at_once(demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = copy_adapter(demo_kit.adapters["colors"], tmp_path / "a")

    def break_three(c: dict) -> None:  # type: ignore[type-arg]
        c["fine_tune_type"] = "qlora"
        c["lora_parameters"]["rank"] = 0
        c["lora_parameters"]["dropout"] = 2

    edit_config(break_three)(adapter)
    report = validate_adapter(adapter)
    wheres = " ".join(f.where for f in report.errors)
    assert "fine_tune_type" in wheres and "rank" in wheres and "dropout" in wheres
    summary = report.summary()
    assert summary.count("\n") >= 3 and "error" in summary


def test_other_base_recorded_is_a_warning_only(demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = copy_adapter(demo_kit.adapters["colors"], tmp_path / "a")
    edit_config(lambda c: c.update(model="someone/other-model"))(adapter)
    result = run_cli("adapter", "validate", str(adapter), "--model", str(demo_kit.model), "--json")
    assert result.exit_code == 0
    data = _json(result)
    assert data["ok"] is True and data["warnings"] == 1
    assert "someone/other-model" in data["findings"][0]["message"]


def test_fp16_adapter_on_fp32_base_warns(demo_kit: DemoKit, tmp_path: Path) -> None:
    import mlx.core as mx

    adapter = copy_adapter(demo_kit.adapters["colors"], tmp_path / "a")
    weights = mx.load(str(adapter / "adapters.safetensors"))
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()}
    )
    report = validate_adapter(adapter, demo_kit.model)
    assert report.ok and any("F16" in w.message for w in report.warnings)


def test_quantized_base(demo_kit: DemoKit, tmp_path: Path) -> None:
    """Input sizes of a 4-bit base are unpacked (packed * 32 / bits) before comparing."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model, save_model

    from mlxman.models.resolve import read_config

    model, _ = load_model(demo_kit.model)
    nn.quantize(model, group_size=32, bits=4)
    out = tmp_path / "q4"
    out.mkdir()
    save_model(out, model)
    config = read_config(demo_kit.model)
    config["quantization"] = {"group_size": 32, "bits": 4}
    (out / "config.json").write_text(json.dumps(config))
    assert validate_adapter(demo_kit.adapters["colors"], out).ok
    assert validate_adapter(demo_kit.adapters["animals"], out).ok
    bad = copy_adapter(demo_kit.adapters["colors"], tmp_path / "bad")
    next(c for c in CASES if c.name == "input_size_mismatch").defect(bad)
    report = validate_adapter(bad, out)
    assert any("4-bit" in e.message for e in report.errors), report.summary()


def test_usage_errors_exit_2(demo_kit: DemoKit, tmp_path: Path) -> None:
    missing = run_cli("adapter", "validate", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    no_model = run_cli(
        "adapter", "validate", str(demo_kit.adapters["colors"]), "--model", str(tmp_path / "nope")
    )
    assert no_model.exit_code == 2
    assert run_cli("adapter", "validate").exit_code == 2


def test_api_never_raises_on_missing_or_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "nope", tmp_path / "file", tmp_path):
        report = validate_adapter(path)
        assert not report.ok and isinstance(report.findings[0], Finding)
    assert isinstance(report, ValidationReport)


def test_read_adapter_config(demo_kit: DemoKit, tmp_path: Path) -> None:
    config = read_adapter_config(demo_kit.adapters["colors"])
    assert config["lora_parameters"]["rank"] > 0
    with pytest.raises(NotFoundError):
        read_adapter_config(tmp_path / "nope")
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(AdapterError):
        read_adapter_config(tmp_path)


def test_subprocess_no_traceback_and_no_heavy_imports(demo_kit: DemoKit, tmp_path: Path) -> None:
    adapter = copy_adapter(demo_kit.adapters["colors"], tmp_path / "a")
    (adapter / "adapters.safetensors").unlink()
    (adapter / "adapters.safetensors").mkdir()
    proc = run_subprocess("adapter", "validate", str(adapter), "--model", str(demo_kit.model))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "directory" in proc.stdout
    heavy = imported_heavy_modules("adapter", "validate", str(demo_kit.adapters["animals"]), "--model",
                                   str(demo_kit.model))  # fmt: skip
    assert heavy == []
    assert imported_heavy_modules("adapter", "info", str(demo_kit.adapters["colors"])) == []


def test_deep_passes_real_and_catches_nan(demo_kit: DemoKit, tmp_path: Path) -> None:
    import mlx.core as mx

    ok = run_cli(
        "adapter", "validate", str(demo_kit.adapters["animals"]), "--model", str(demo_kit.model), "--deep"
    )
    assert ok.exit_code == 0, ok.stdout
    adapter = copy_adapter(demo_kit.adapters["colors"], tmp_path / "nan")
    weights = dict(mx.load(str(adapter / "adapters.safetensors")))
    name = sorted(weights)[0]
    weights[name] = weights[name] * float("nan")
    mx.save_safetensors(str(adapter / "adapters.safetensors"), weights)
    assert validate_adapter(adapter, demo_kit.model).ok  # headers cannot see values
    result = run_cli("adapter", "validate", str(adapter), "--model", str(demo_kit.model), "--deep", "--json")
    assert result.exit_code == 1
    assert any(name in f["where"] and "NaN" in f["message"] for f in _json(result)["findings"])


def test_deep_check_api_on_sound_adapter(demo_kit: DemoKit) -> None:
    """deep_check adds mlx-lm's verdict to a header report and marks it deep."""
    from mlxman.adapters.deep import deep_check

    report = validate_adapter(demo_kit.adapters["colors"], demo_kit.model)
    deep_check(report, demo_kit.model)
    assert report.ok and report.deep


def test_mlx_vlm_and_peft_formats_are_detected(demo_kit: DemoKit, tmp_path: Path) -> None:
    """mlx-vlm's legacy adapters ({rank, alpha, dropout}, fully qualified .A/.B) validate as mlx-vlm."""
    import numpy as np
    from safetensors.numpy import save_file

    vlm = tmp_path / "vlm"
    vlm.mkdir()
    (vlm / "adapter_config.json").write_text(json.dumps({"rank": 4, "alpha": 0.1, "dropout": 0.0}))
    tensors = {}
    for layer in (0, 1):
        prefix = f"language_model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.A"] = np.zeros((64, 4), np.float32)
        tensors[f"{prefix}.B"] = np.zeros((4, 64), np.float32)
    save_file(tensors, str(vlm / "adapters.safetensors"))
    report = validate_adapter(vlm)
    assert report.format == "mlx-vlm" and report.ok, report.summary()
    tensors["language_model.model.layers.0.self_attn.q_proj.B"] = np.zeros((2, 64), np.float32)
    save_file(tensors, str(vlm / "adapters.safetensors"))
    assert not validate_adapter(vlm).ok
