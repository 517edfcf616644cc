"""Embeddings from an mlx-embeddings model: unit-norm vectors for a list of texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlxman.errors import ModelError, UsageError

# Bound one request so a huge batch cannot exhaust memory; a tokenizer truncates each text to this length.
MAX_TEXTS = 2048
MAX_TEXT_TOKENS = 512


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int

    @property
    def dimensions(self) -> int:
        return len(self.vectors[0]) if self.vectors else 0


def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str]) -> EmbeddingResult:
    """Mean-pooled, L2-normalised embeddings (mlx-embeddings' ``text_embeds``), one per text."""
    if not texts:
        raise UsageError("No text to embed", "pass one or more texts, or pipe lines on stdin")
    if len(texts) > MAX_TEXTS:
        raise UsageError(
            f"Too many texts: {len(texts)} (at most {MAX_TEXTS})", "split the input into batches"
        )
    import mlx.core as mx

    inputs = tokenizer(
        list(texts),
        return_tensors="mlx",
        padding=True,
        truncation=True,
        max_length=max_text_tokens(model, tokenizer),
    )
    outputs = model(**inputs)
    vectors = outputs.text_embeds.astype(mx.float32)
    if not bool(mx.all(mx.isfinite(vectors)).item()):
        raise ModelError(
            "The embeddings model produced values that are not finite numbers",
            "check the model's weights (a broken or mis-converted model gives NaN or infinity)",
        )
    prompt_tokens = int(inputs["attention_mask"].sum().item()) if "attention_mask" in inputs else 0
    return EmbeddingResult(vectors=vectors.tolist(), prompt_tokens=prompt_tokens)


def max_text_tokens(model: Any, tokenizer: Any) -> int:
    """Tokens kept per text: the model's own position limit, the tokenizer's, and MAX_TEXT_TOKENS."""
    limits = [MAX_TEXT_TOKENS]
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)); only real limits count.
    declared = getattr(tokenizer, "model_max_length", None)
    for value in (positions, declared):
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1_000_000:
            limits.append(value)
    return min(limits)
