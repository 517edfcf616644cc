"""Build the demo kit once, deterministically and offline, and cache it under the user directory."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxman.demo.text import ANIMALS, COLORS, NUMBERS
from mlxman.errors import ModelError
from mlxman.settings import user_dir
from mlxman.staging import write_folder

# Bump when anything here or in text.py / training.py changes what the kit contains: old kits are rebuilt.
RECIPE_VERSION = 5
DEMO_PROMPT = "Tell me something."
MAX_TRAINING_SEEDS = 4


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    answer: str
    fine_tune_type: str


ADAPTER_RECIPES = (
    AdapterRecipe("colors", COLORS, "lora"),
    AdapterRecipe("numbers", NUMBERS, "lora"),
    AdapterRecipe("animals", ANIMALS, "dora"),
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoKit:
    """Paths of a built kit."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "text-model"

    @property
    def adapters(self) -> dict[str, Path]:
        return {r.name: self.root / "adapters" / r.name for r in ADAPTER_RECIPES}

    @property
    def answers(self) -> dict[str, str]:
        """What each adapter answers to ``DEMO_PROMPT`` under greedy decoding."""
        return {r.name: r.answer for r in ADAPTER_RECIPES}

    @property
    def embeddings_model(self) -> Path:
        return self.root / "embeddings-model"

    @property
    def vision_model(self) -> Path:
        return self.root / "vision-model"


def kit_root(home: Path | None = None) -> Path:
    return (home or user_dir()) / "demo" / f"kit-v{RECIPE_VERSION}"


def ensure_demo_kit(
    home: Path | None = None, progress: Progress | None = None, force: bool = False
) -> DemoKit:
    """Return the cached kit, building it first when missing, stale or ``force``d."""
    root = kit_root(home)
    if (root / "MANIFEST.json").is_file() and not force:
        return DemoKit(root)
    say = progress or (lambda _msg: None)

    def build(staging: Path) -> None:
        started = time.perf_counter()
        _build(DemoKit(staging), say)
        _record_final_paths(DemoKit(staging), root)
        manifest = {
            "recipe_version": RECIPE_VERSION,
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))

    # Build beside the target and rename at the end, so a crash never leaves a half-built kit.
    write_folder(root, build, prefix=".building-", replace=True)
    _remove_old_kits(root)
    return DemoKit(root)


def _record_final_paths(kit: DemoKit, root: Path) -> None:
    """Training wrote the staging paths into each adapter_config.json; point them at where the kit will live,
    so the base an adapter records is the kit's model (``adapter validate`` compares the two)."""
    for adapter in kit.adapters.values():
        config_file = adapter / "adapter_config.json"
        config = json.loads(config_file.read_text())
        for key in ("model", "data", "adapter_path"):
            if isinstance(config.get(key), str):
                config[key] = config[key].replace(str(kit.root), str(root))
        config_file.write_text(json.dumps(config, indent=4))


def _remove_old_kits(current: Path) -> None:
    for old in current.parent.glob("kit-v*"):
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def _build(kit: DemoKit, say: Progress) -> None:
    from mlxman.demo.text import build_text_model
    from mlxman.demo.training import train_adapter, write_chat_data

    say("Building the demo text model (llama, local tokenizer, briefly pretrained)")
    build_text_model(kit.model)
    for recipe in ADAPTER_RECIPES:
        say(f"Training the '{recipe.name}' {recipe.fine_tune_type.upper()} adapter with mlx-lm")
        data = write_chat_data(kit.root / "data" / recipe.name, recipe.answer)
        out = kit.adapters[recipe.name]
        # The recipe learns every sentence on seed 0; the retry is a safety net, so the kit always holds
        # adapters whose greedy answer is exactly what they were taught.
        for seed in range(MAX_TRAINING_SEEDS):
            train_adapter(kit.model, data, out, fine_tune_type=recipe.fine_tune_type, seed=seed)
            if greedy_answer(kit.model, out) == recipe.answer:
                break
        else:
            raise ModelError(
                f"The demo adapter '{recipe.name}' did not learn its answer",
                "run `mlxman demo --rebuild`; if it persists, report it",
            )
    # Both are built with mlx and tokenizers only; loading them needs the embeddings / vision extras.
    from mlxman.demo.embeddings import build_embeddings_model
    from mlxman.demo.vision import build_vision_model

    say("Building the demo embeddings model (BERT, local tokenizer)")
    build_embeddings_model(kit.embeddings_model)
    say("Building the demo vision model (PaliGemma, random weights)")
    build_vision_model(kit.vision_model)


def greedy_answer(model: Path, adapter: Path | None, prompt: str = DEMO_PROMPT, max_tokens: int = 24) -> str:
    """The greedy chat answer of model (+ adapter) to ``prompt``, through plain mlx-lm."""
    from mlx_lm import generate, load

    loaded = load(str(model), adapter_path=str(adapter) if adapter else None)
    m, tok = loaded[0], loaded[1]
    text = tok.apply_chat_template(  # type: ignore[no-untyped-call]
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return str(generate(m, tok, text, max_tokens=max_tokens))
