"""Test models built from the demo kit's: one whose prompts can be long, so a prefill takes a while."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# A context larger than any test prompt; the demo model's own config allows only 2048 positions.
LONG_POSITIONS = 1 << 20
# Repeats of a 4-word phrase (5 demo tokens): a prefill of many chunks, tens of seconds on a CPU.
LONG_PROMPT_REPEATS = 3000
LONG_CONTEXT = 32768


def long_context_copy(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose config allows a long context (llama's RoPE has no hard limit)."""
    shutil.copytree(model, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = LONG_POSITIONS
    (out / "config.json").write_text(json.dumps(config))
    return out


def long_prompt(repeats: int = LONG_PROMPT_REPEATS) -> str:
    return " ".join(["red green blue yellow"] * repeats)
