"""Embeddings from an mlx-embeddings model: unit-norm vectors for a list of texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlxman.errors import UsageError

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
        list(texts), return_tensors="mlx", padding=True, truncation=True, max_length=MAX_TEXT_TOKENS
    )
    outputs = model(**inputs)
    vectors = outputs.text_embeds.astype(mx.float32)
    prompt_tokens = int(inputs["attention_mask"].sum().item()) if "attention_mask" in inputs else 0
    return EmbeddingResult(vectors=vectors.tolist(), prompt_tokens=prompt_tokens)
