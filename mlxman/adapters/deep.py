"""``--deep``: apply the adapter to the lazily loaded base with mlx-lm, and check its values are finite."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from mlxman.adapters.findings import ValidationReport
from mlxman.adapters.formats import weights_file


def deep_check(report: ValidationReport, model_dir: Path | None) -> ValidationReport:
    """Add mlx-lm's own verdict and a NaN/Inf scan to a header-only report (only when that one is sound)."""
    report.deep = True
    if not report.ok:
        return report
    import os

    import mlx.core as mx

    from mlxman.safetensors_header import load_tensors

    adapter = report.adapter_dir
    wfile = weights_file(report.format, set(os.listdir(adapter)))
    try:
        weights = load_tensors(adapter / wfile)
    except ValueError as exc:
        report.error(wfile, str(exc).removeprefix(f"{wfile} "), "re-save or re-download it")
        return report
    for name, value in sorted(weights.items()):
        if not bool(mx.isfinite(value.astype(mx.float32)).all()):
            bad = int((~mx.isfinite(value.astype(mx.float32))).sum())
            report.error(
                f"{wfile}: {name}",
                f"holds {bad} NaN or Inf value(s) (a diverged training run?)",
                "retrain with a lower learning rate, or use an earlier checkpoint",
            )
    if model_dir is None or report.format != "mlx" or not report.ok:
        return report
    _apply_with_mlx_lm(report, model_dir)
    return report


def _apply_with_mlx_lm(report: ValidationReport, model_dir: Path) -> None:
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    from mlxman.errors import AdapterError, MlxmanError
    from mlxman.models.preflight import check_loader_files
    from mlxman.models.resolve import resolve_model

    path = resolve_model(str(model_dir)).path
    try:
        # mlx-lm opens the folder's files itself: a FIFO there would block it forever.
        check_loader_files(path, report.adapter_dir)
    except MlxmanError as exc:
        report.error("adapter" if isinstance(exc, AdapterError) else "model", exc.message, exc.hint or "")
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model, _ = load_model(path, lazy=True)
    except Exception as exc:
        report.error("model", f"mlx-lm cannot load the base model: {exc}", "check --model")
        return
    try:
        load_adapters(model, str(report.adapter_dir))
    except Exception as exc:  # mlx-lm reports every mismatch as ValueError/KeyError/AttributeError
        text = " ".join(str(exc).split())
        report.error(
            "mlx-lm",
            f"refuses the adapter: {type(exc).__name__}: {text[:600]}",
            "fix the tensors or config it names",
        )
