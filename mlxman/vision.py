"""Generation with images on an mlx-vlm model, with the same stats as text generation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.errors import NotFoundError
from mlxman.generate import GenerationRequest, GenerationStats, chat_messages


def check_images(images: tuple[str, ...] | list[str]) -> list[str]:
    """Every image must be a readable local file: mlx-vlm would otherwise try to fetch it as a URL."""
    paths = []
    for image in images:
        path = Path(image).expanduser()
        if not path.is_file():
            raise NotFoundError(f"Image {image} does not exist or is not a file", "pass a local image path")
        paths.append(str(path.resolve()))
    return paths


@dataclass
class VisionGeneration:
    """Iterate for text pieces from a vision model; ``stats`` is complete once iteration ends."""

    model: Any
    processor: Any
    request: GenerationRequest
    stats: GenerationStats = field(default_factory=GenerationStats)
    text: str = ""

    def __iter__(self) -> Iterator[str]:
        import mlx.core as mx
        from mlx_vlm.generate import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        images = check_images(list(self.request.images))
        config = getattr(self.model, "config", {})
        prompt: Any = self.request.prompt
        if not self.request.raw:
            prompt = apply_chat_template(
                self.processor, config, chat_messages(self.request), num_images=len(images)
            )
        if self.request.seed is not None:
            mx.random.seed(self.request.seed)
        stats = self.stats
        mx.reset_peak_memory()
        started = time.perf_counter()
        kwargs: dict[str, Any] = {
            "max_tokens": self.request.max_tokens,
            "temperature": self.request.temperature,
        }
        if self.request.top_p < 1.0:
            kwargs["top_p"] = self.request.top_p
        try:
            for result in stream_generate(self.model, self.processor, prompt, image=images or None, **kwargs):
                if not stats.time_to_first_token:
                    stats.time_to_first_token = time.perf_counter() - started
                stats.prompt_tokens = result.prompt_tokens
                stats.generation_tokens = result.generation_tokens
                stats.prompt_tps = result.prompt_tps
                stats.generation_tps = result.generation_tps
                stats.finish_reason = result.finish_reason
                if result.text:
                    self.text += result.text
                    yield result.text
        finally:
            stats.seconds = time.perf_counter() - started
            stats.peak_memory_bytes = int(mx.get_peak_memory())
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"
