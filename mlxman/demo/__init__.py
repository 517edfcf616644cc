"""The demo kit: small real models and adapters built offline, for ``mlxman demo`` and the tests."""

from mlxman.demo.kit import DemoKit, ensure_demo_kit

__all__ = ["DemoKit", "ensure_demo_kit"]
