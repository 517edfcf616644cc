"""Generation with images on an mlx-vlm model, with the same stats as text generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxman.errors import NotFoundError
from mlxman.files import IMAGE_MAX_BYTES, FileProblem, check_regular_file
from mlxman.generate import GenerationRequest, StreamingGeneration, chat_messages


def check_images(images: tuple[str, ...] | list[str]) -> list[str]:
    """Every image must be a readable local file: mlx-vlm would otherwise try to fetch it as a URL."""
    paths = []
    for image in images:
        path = Path(image).expanduser()
        try:
            st = check_regular_file(path)
        except FileProblem as exc:
            raise NotFoundError(f"Image {image}: {exc}", "pass a local image path") from None
        if st.st_size > IMAGE_MAX_BYTES:
            raise NotFoundError(
                f"Image {image} is {st.st_size:,} bytes, over the {IMAGE_MAX_BYTES:,}-byte limit",
                "pass a smaller image",
            )
        paths.append(str(path.resolve()))
    return paths


class VisionGeneration(StreamingGeneration):
    """Generation from a vision model with mlx-vlm's ``stream_generate``, images included."""

    def __init__(self, model: Any, processor: Any, request: GenerationRequest) -> None:
        super().__init__(request)
        self.model, self.processor = model, processor

    def responses(self) -> Iterator[Any]:
        from mlx_vlm.generate import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        images = check_images(list(self.request.images))
        prompt: Any = self.request.prompt
        if not self.request.raw:
            config = getattr(self.model, "config", {})
            prompt = apply_chat_template(
                self.processor, config, chat_messages(self.request), num_images=len(images)
            )
        kwargs: dict[str, Any] = {
            "max_tokens": self.request.max_tokens,
            "temperature": self.request.temperature,
        }
        if self.request.top_p < 1.0:
            kwargs["top_p"] = self.request.top_p
        return iter(stream_generate(self.model, self.processor, prompt, image=images or None, **kwargs))
