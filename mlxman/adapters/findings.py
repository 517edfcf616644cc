"""What validation found: each problem with its severity, where it is and what to do about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]
AdapterFormat = Literal["mlx", "peft", "mlx-vlm", "unknown"]


@dataclass(frozen=True)
class Finding:
    """One problem: ``where`` names the file, tensor or config key; ``hint`` the next step."""

    severity: Severity
    where: str
    message: str
    hint: str = ""

    def line(self) -> str:
        text = f"{self.severity}: {self.where}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text


@dataclass
class ValidationReport:
    """Every finding about one adapter, collected before any verdict."""

    adapter_dir: Path
    model_dir: Path | None = None
    format: AdapterFormat = "unknown"
    fine_tune_type: str | None = None
    findings: list[Finding] = field(default_factory=list)
    deep: bool = False

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, message: str, hint: str = "") -> None:
        self.findings.append(Finding("error", where, message, hint))

    def warning(self, where: str, message: str, hint: str = "") -> None:
        self.findings.append(Finding("warning", where, message, hint))

    def summary(self) -> str:
        """The errors as plain text, one per line (the warnings when there are no errors)."""
        shown = self.errors or self.warnings
        if not shown:
            return f"Adapter {self.adapter_dir} is sound."
        head = f"Adapter {self.adapter_dir}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return "\n".join([head, *(f"  - {f.line()}" for f in shown)])

    def to_dict(self) -> dict[str, object]:
        return {
            "adapter": str(self.adapter_dir),
            "model": str(self.model_dir) if self.model_dir else None,
            "ok": self.ok,
            "format": self.format,
            "fine_tune_type": self.fine_tune_type,
            "deep": self.deep,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "findings": [
                {"severity": f.severity, "where": f.where, "message": f.message, "hint": f.hint}
                for f in self.findings
            ],
        }
