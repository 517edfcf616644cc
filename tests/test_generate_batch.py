"""``mlxman generate`` with several adapters runs them as one batch on an engine over the shared base."""

from __future__ import annotations

from mlxman.demo import DemoKit
from mlxman.demo.kit import DEMO_PROMPT
from tests.helpers import run_cli
from tests.test_generate_cli import generate_json


def test_several_adapters_run_as_one_batch_and_say_so(demo_kit: DemoKit) -> None:
    """`-a none -a A -a B`: one engine batch; each answer is what it is alone (the DoRA one swapped in)."""
    names = ["colors", "numbers", "animals"]
    args = [a for n in names for a in ("--adapter", str(demo_kit.adapters[n]))]
    result = run_cli("generate", "--model", str(demo_kit.model), "--prompt", DEMO_PROMPT, "-a", "none", *args)
    assert result.exit_code == 0, result.stderr
    assert "Ran the 4 answers as one batch" in result.stderr
    for name in names:
        (alone,) = generate_json(demo_kit, "--adapter", str(demo_kit.adapters[name]))
        assert f"── {name} ──\n{alone['text']}\n" in result.stdout
