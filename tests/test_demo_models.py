"""The demo kit's tiny embeddings and vision models build offline and run in mlx-embeddings and mlx-vlm."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from mlxman.demo.embeddings import HIDDEN, build_embeddings_model
from mlxman.demo.vision import build_vision_model

# A path that did not exist would otherwise be sent to the Hugging Face Hub.
os.environ["HF_HUB_OFFLINE"] = "1"

# Every test here builds or loads a real (tiny) model.
pytestmark = pytest.mark.slow


def _same_files(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


@pytest.fixture(scope="module")
def embeddings_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_embeddings_model(tmp_path_factory.mktemp("demo") / "embeddings-model")


@pytest.fixture(scope="module")
def loaded_embeddings(embeddings_model: Path) -> tuple[Any, Any]:
    mlx_embeddings = pytest.importorskip("mlx_embeddings")
    return mlx_embeddings.load(str(embeddings_model))  # type: ignore[no-any-return]


def _embed(loaded: tuple[Any, Any], texts: list[str]) -> Any:
    import mlx_embeddings

    model, tokenizer = loaded
    return mlx_embeddings.generate(model, tokenizer, texts).text_embeds


def test_embeddings_model_looks_like_sentence_transformers(embeddings_model: Path) -> None:
    config = json.loads((embeddings_model / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (embeddings_model / "model.safetensors").is_file()
    assert (embeddings_model / "tokenizer.json").is_file()
    modules = json.loads((embeddings_model / "modules.json").read_text())
    assert any(m["type"].endswith("Pooling") for m in modules)
    pooling = json.loads((embeddings_model / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == config["hidden_size"] == HIDDEN


def test_embeddings_shape_and_unit_norm(loaded_embeddings: tuple[Any, Any]) -> None:
    import mlx.core as mx

    texts = ["red green blue", "one two three four five", "The quick brown fox jumps over the lazy dog."]
    embeds = _embed(loaded_embeddings, texts)
    assert embeds.shape == (len(texts), HIDDEN)
    norms = mx.linalg.norm(embeds, axis=-1).tolist()
    assert norms == pytest.approx([1.0] * len(texts), abs=1e-4)


def test_different_texts_give_different_vectors(loaded_embeddings: tuple[Any, Any]) -> None:
    import mlx.core as mx

    embeds = _embed(loaded_embeddings, ["cat dog bird", "one two three", "cat dog bird"])
    similarity = (embeds @ embeds.T).tolist()
    assert similarity[0][1] < 0.999
    assert similarity[0][2] == pytest.approx(1.0, abs=1e-5)
    assert not mx.allclose(embeds[0], embeds[1]).item()


def test_embeddings_build_is_deterministic(embeddings_model: Path, tmp_path: Path) -> None:
    assert _same_files(embeddings_model, build_embeddings_model(tmp_path / "again"))


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_model(tmp_path_factory.mktemp("demo") / "vision-model")


@pytest.fixture(scope="module")
def loaded_vision(vision_model: Path) -> tuple[Any, Any]:
    return _vlm().load(str(vision_model))  # type: ignore[no-any-return]


def _vlm() -> Any:
    """mlx-vlm is an optional extra: its tests skip without it."""
    return pytest.importorskip("mlx_vlm")


def test_vision_model_is_detectable(vision_model: Path) -> None:
    config = json.loads((vision_model / "config.json").read_text())
    assert "vision_config" in config
    assert config["architectures"][0].endswith("ForConditionalGeneration")
    assert (vision_model / "preprocessor_config.json").is_file()
    assert (vision_model / "tokenizer.json").is_file()


def test_vision_generates_for_an_image(loaded_vision: tuple[Any, Any]) -> None:
    from PIL import Image

    vlm, (model, processor) = _vlm(), loaded_vision
    prompt = vlm.apply_chat_template(processor, model.config, "What is in the image?", num_images=1)
    image = Image.new("RGB", (48, 40), (200, 30, 30))
    result = vlm.generate(model, processor, prompt, image=[image], max_tokens=8, verbose=False)
    assert isinstance(result.text, str)
    assert result.text.strip()


def test_vision_generates_text_only(loaded_vision: tuple[Any, Any]) -> None:
    model, processor = loaded_vision
    result = _vlm().generate(model, processor, "Describe it.", max_tokens=8, verbose=False)
    assert result.text.strip()


def test_vision_build_is_deterministic(vision_model: Path, tmp_path: Path) -> None:
    assert _same_files(vision_model, build_vision_model(tmp_path / "again"))


def test_a_text_longer_than_the_model_positions_is_truncated_not_nan(
    loaded_embeddings: tuple[Any, Any],
) -> None:
    """The demo BERT has 128 positions: a 1,000-word text is cut to them, never run past them (NaN)."""
    import math

    from mlxman.embed import embed_texts, max_text_tokens

    model, tokenizer = loaded_embeddings
    assert max_text_tokens(model, tokenizer) == 128
    result = embed_texts(model, tokenizer, ["word " * 1000, "red green blue"])
    assert all(math.isfinite(x) for vector in result.vectors for x in vector)
    assert result.prompt_tokens <= 2 * 128
