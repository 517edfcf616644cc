"""``mlxman adapter``: validate, describe, convert and fuse LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mlxman.adapters.findings import ValidationReport
from mlxman.adapters.formats import FORMAT_NAMES
from mlxman.cli.options import JsonOption
from mlxman.errors import UsageError
from mlxman.files import MISSING, path_problem, shown_path, too_long
from mlxman.memory import format_bytes
from mlxman.output import out

app = typer.Typer(help="Validate, inspect, convert and fuse LoRA adapters.", no_args_is_help=True)

AdapterArg = Annotated[Path, typer.Argument(help="The adapter folder (adapter_config.json + weights).")]
ModelOption = Annotated[
    Optional[str],
    typer.Option(
        "--model", "-m", help="Base model: a local folder, a cached Hugging Face id, or a name (`alias`)."
    ),
]


def _existing(path: Path) -> Path:
    """A path that names nothing is a usage error (exit 2), not a broken adapter."""
    problem = path_problem(path, want_dir=True)
    if problem == MISSING or too_long(problem):
        raise UsageError(
            f"{shown_path(path)} {'does not exist' if problem == MISSING else problem}",
            "pass the folder of an adapter",
        )
    return path


def _base(model: str | None) -> Path | None:
    if model is None:
        return None
    from mlxman.errors import MlxmanError
    from mlxman.models.resolve import resolve_model

    try:
        return resolve_model(model).path
    except MlxmanError as exc:
        raise UsageError(exc.message, exc.hint) from None


@app.command()
def validate(
    adapter: AdapterArg,
    model: ModelOption = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep", help="Also apply it with mlx-lm on the lazily loaded base and scan for NaN/Inf."
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Check an adapter (and its fit to a base) without loading weights. Exit 0 sound, 1 not, 2 usage."""
    from mlxman.adapters.validate import validate_adapter

    report = validate_adapter(_existing(adapter), _base(model))
    if deep:
        from mlxman.adapters.deep import deep_check

        deep_check(report, _base(model))
    if json_output:
        out.json(report.to_dict())
    else:
        _render_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _render_report(report: ValidationReport) -> None:
    what = f"{FORMAT_NAMES[report.format]} {(report.fine_tune_type or '').upper()} adapter".replace("  ", " ")
    for f in report.findings:
        style = "error" if f.severity == "error" else "warning"
        line = f"[{style}]{f.severity:7}[/{style}] [key]{f.where}[/key]: {f.message}"
        out.show(line + (f" [hint]({f.hint})[/hint]" if f.hint else ""))
    verdict = "[ok]sound[/ok]" if report.ok else "[error]not sound[/error]"
    counts = f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)"
    checked = " with --deep" if report.deep else ""
    base = f" against {report.model_dir}" if report.model_dir else ""
    out.show(f"{report.adapter_dir}: {what}{base}{checked}: {verdict} ({counts})")


@app.command()
def info(adapter: AdapterArg, json_output: JsonOption = False) -> None:
    """Show an adapter's format, rank, scale, layers, targets, size, base model and training settings."""
    from mlxman.adapters.info import adapter_info

    data = adapter_info(_existing(adapter))
    if json_output:
        out.json(data)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="key")
    grid.add_column()
    scale = "-" if data.scale is None else f"{data.scale:g}"
    if data.alpha is not None:
        scale += f" (alpha {data.alpha:g})"
    layers = ", ".join(map(str, data.layers)) or "-"
    rows = [
        ("Path", str(data.path)),
        ("Format", f"{FORMAT_NAMES[data.format]} ({data.weights_file})"),
        ("Type", data.fine_tune_type),
        ("Rank", "-" if data.rank is None else str(data.rank)),
        ("Scale", scale),
        ("Layers", f"{layers} (num_layers {data.num_layers})" if data.num_layers is not None else layers),
        ("Targets", ", ".join(data.target_modules) or "-"),
        ("Parameters", f"{data.parameters:,}"),
        ("Size", f"{format_bytes(data.bytes)} ({', '.join(data.dtypes)})"),
        ("Base model", data.base_model or "not recorded"),
    ]
    for key, value in rows:
        grid.add_row(key, value)
    if data.training:
        shown = {k: v for k, v in data.training.items() if not isinstance(v, (dict, list))}
        grid.add_row("Training", ", ".join(f"{k}={v}" for k, v in sorted(shown.items())))
    from rich.panel import Panel

    out.show(Panel(grid, title=f"adapter {data.path.name}", title_align="left", expand=False))


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="The adapter to convert.")],
    dst: Annotated[Path, typer.Argument(help="A new folder for the converted adapter.")],
    to: Annotated[str, typer.Option("--to", help="Target format: mlx (mlx-lm) or peft (Hugging Face PEFT).")],
    model: ModelOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace DST if it exists.")] = False,
    json_output: JsonOption = False,
) -> None:
    """Convert between Hugging Face PEFT and mlx-lm adapters, giving the same outputs on the same base."""
    from mlxman.adapters.convert import convert_adapter

    if to not in ("mlx", "peft"):
        raise UsageError(f"--to must be mlx or peft, not {to!r}", "pass --to mlx or --to peft")
    result = convert_adapter(_existing(src), dst, to, model=_base(model), force=force)  # type: ignore[arg-type]
    if json_output:
        out.json(result)
        return
    folded = f", {result.folded_modules} module scale(s) folded into B" if result.folded_modules else ""
    out.success(
        f"Converted {result.source} ({result.source_format}) to {result.destination} "
        f"({result.target_format}): "
        f"{result.modules} modules, rank {result.rank}, scale {result.scale:g}{folded}"
    )


@app.command()
def fuse(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Base model: a local folder or a cached HF id.")
    ],
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="The adapter folder to fuse in.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="A new folder for the fused model.")],
    dequantize: Annotated[
        bool, typer.Option("--dequantize", help="Write a dequantized (float) model.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Validate, then fuse an adapter into a new model folder (one adapter at base speed)."""
    from mlxman.adapters.fuse import fuse_adapter

    base = _base(model)
    assert base is not None
    out.info(f"Fusing {adapter} into {model}")
    result = fuse_adapter(str(base), _existing(adapter), out_dir, dequantize=dequantize)
    if json_output:
        out.json(result)
        return
    out.success(f"Wrote {result.output} ({result.fused_modules} modules fused)")
