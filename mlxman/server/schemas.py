"""Request and response bodies of the server: OpenAI-compatible shapes with bounded sizes."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from mlxman.generate import MAX_SEED, MAX_TOKENS_LIMIT

# Bounds on what one request may ask for: big enough for real use, small enough that a typo fails fast.
MAX_TEXT_CHARS = 1_000_000
MAX_MESSAGES = 512
MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 2048
MAX_MODEL_NAME_CHARS = 4096

ModelName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_MODEL_NAME_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Stop = Union[Text, Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)], None]


class Lenient(BaseModel):
    """OpenAI clients send fields mlxman does not use (``user``, ``n=1``...): accept and ignore them."""

    model_config = ConfigDict(extra="ignore")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Lenient):
    type: Literal["text"]
    text: Text


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[Text, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Lenient):
    include_usage: bool = False


KeepAlive = Optional[Union[Annotated[str, StringConstraints(max_length=32)], float]]


class SamplingFields(Lenient):
    model: ModelName
    # Ollama's per-request keep-alive ("5m", 0, -1); not part of OpenAI's API.
    keep_alive: KeepAlive = None
    max_tokens: Optional[MaxTokens] = None
    temperature: Optional[Temperature] = None
    top_p: Optional[TopP] = None
    seed: Optional[Seed] = None
    stop: Stop = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Annotated[int, Field(ge=1, le=1)] = 1
    # vLLM's field: keep only the prompt's last N tokens; -1 keeps as much of its end as fits the context.
    truncate_prompt_tokens: Optional[Annotated[int, Field(ge=-1, le=2**31)]] = None

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Optional[MaxTokens] = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # One prompt per request: a list is accepted only when it holds exactly one string.
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=1)]]
    echo: bool = False

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def token_limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(Lenient):
    model: ModelName
    keep_alive: KeepAlive = None
    input: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]]
    encoding_format: Literal["float", "base64"] = "float"

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


# Admin bodies: strict, since only mlxman's own client sends them.


class LoadRequest(Strict):
    model: ModelName
    adapter: Optional[ModelName] = None
    pin: bool = False
    keep_alive: Optional[Annotated[str, StringConstraints(max_length=32)]] = None
    kind: Optional[Literal["text", "vision", "embeddings"]] = None


class KeyRequest(Strict):
    key: ModelName


class EstimateRequest(Strict):
    model: ModelName
    adapters: Annotated[list[ModelName], Field(max_length=64)] = []


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}
