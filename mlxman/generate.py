"""Text generation on a loaded model: prompt building (chat templates) and streaming with stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mlxman.errors import ContextError, UsageError
from mlxman.settings import DEFAULT_MAX_TOKENS

# Upper bound for one request: a typo like --max-tokens 1e9 should fail fast, not run for hours.
MAX_TOKENS_LIMIT = 32768
# MLX seeds its generator with an unsigned 64-bit integer; anything else is a TypeError deep in generation.
MAX_SEED = 2**64 - 1
# Prompt tokens per model call; a stop request (client gone, server stopping) is seen between two calls.
PREFILL_STEP_TOKENS = 512
# ``truncate_prompt_tokens`` value for "keep as much of the prompt's end as fits the context" (vLLM's -1).
TRUNCATE_TO_FIT = -1


class GenerationStopped(Exception):
    """Raised inside prefill when the caller asked to stop; the generation ends as cancelled."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a prompt (or chat messages) and the sampling settings."""

    prompt: str = ""
    messages: Sequence[dict[str, Any]] | None = None
    system: str | None = None
    raw: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    images: Sequence[str] = ()
    # Keep only the prompt's last N tokens (TRUNCATE_TO_FIT: as many as fit the context with max_tokens).
    truncate_prompt_tokens: int | None = None

    def check(self) -> None:
        """Reject nonsense before any model work."""
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise UsageError(
                f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {self.max_tokens}",
                f"pass --max-tokens between 1 and {MAX_TOKENS_LIMIT}",
            )
        if not 0.0 <= self.temperature <= 10.0:
            raise UsageError(f"temperature must be in [0, 10], got {self.temperature}", "use e.g. --temp 0.7")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", "use e.g. --top-p 0.9")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f"seed must be in [0, 2**64 - 1], got {self.seed}", "pass --seed 0 or more")
        if self.messages is None and not self.prompt:
            raise UsageError("The prompt is empty", "pass --prompt TEXT or pipe the prompt on stdin")
        keep = self.truncate_prompt_tokens
        if keep is not None and keep != TRUNCATE_TO_FIT and keep < 1:
            raise UsageError(
                f"truncate_prompt_tokens must be {TRUNCATE_TO_FIT} or at least 1, got {keep}",
                f"send a token count, or {TRUNCATE_TO_FIT} to keep the end of the prompt that fits",
            )


def fit_context(tokens: list[int], request: GenerationRequest, context_tokens: int, hint: str) -> list[int]:
    """The prompt to run: cut from the start when the request asks for it, refused when it cannot fit.

    The prompt plus ``max_tokens`` must fit the context the pool admitted the model with (its KV headroom).
    """
    keep = request.truncate_prompt_tokens
    if keep == TRUNCATE_TO_FIT:
        keep = context_tokens - request.max_tokens
    if keep is not None and 0 < keep < len(tokens):
        tokens = tokens[-keep:]
    total = len(tokens) + request.max_tokens
    if total > context_tokens:
        prompt, limit = _tokens(len(tokens)), _tokens(context_tokens)
        raise ContextError(
            f"The prompt has {prompt} and max_tokens is {request.max_tokens}: {_tokens(total)}, "
            f"over the context of {limit}",
            hint,
        )
    return tokens


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


@dataclass
class GenerationStats:
    """Counters in the style of ``ollama run --verbose`` and mlx-lm."""

    prompt_tokens: int = 0
    # Prompt tokens read so far: all of them once a token is out, fewer when stopped during prefill.
    prefilled_tokens: int = 0
    generation_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str | None = None


def chat_messages(request: GenerationRequest) -> list[dict[str, Any]]:
    if request.messages is not None:
        return [dict(m) for m in request.messages]
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    return messages


# transformers warns on stderr when a prompt is longer than the tokenizer's model_max_length; mlxman checks
# the prompt against the admitted context itself and says so in one clear error.
_QUIET = {"verbose": False}


def prompt_tokens(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids for the request: the chat template when the tokenizer has one and ``raw`` is off."""
    if not request.raw and getattr(tokenizer, "has_chat_template", False):
        text = tokenizer.apply_chat_template(
            chat_messages(request), add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(text, add_special_tokens=False, **_QUIET))
    if request.messages is not None:
        text = "\n".join(str(m.get("content", "")) for m in request.messages)
    else:
        text = f"{request.system}\n{request.prompt}" if request.system else request.prompt
    return list(tokenizer.encode(text, **_QUIET))


class StreamingGeneration:
    """Iterate for text pieces as they are decoded; ``stats`` is complete once iteration ends.

    Subclasses start their backend's stream in ``responses``; its items carry mlx-lm's fields
    (text, prompt_tokens, generation_tokens, prompt_tps, generation_tps, finish_reason).
    """

    def __init__(self, request: GenerationRequest, should_stop: Callable[[], bool] | None = None) -> None:
        self.request = request
        self.stats = GenerationStats()
        self.text = ""
        # Polled between prefill chunks and after every token: True ends the generation as "cancelled".
        self.should_stop = should_stop or (lambda: False)

    def responses(self) -> Iterator[Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        import mlx.core as mx

        if self.request.seed is not None:
            mx.random.seed(self.request.seed)
        stats = self.stats
        mx.reset_peak_memory()
        started = time.perf_counter()
        responses = self.responses()
        try:
            for response in responses:
                if self.should_stop():
                    stats.finish_reason = "cancelled"
                    return
                if not stats.time_to_first_token:
                    stats.time_to_first_token = time.perf_counter() - started
                stats.prompt_tokens = stats.prefilled_tokens = response.prompt_tokens
                stats.generation_tokens = response.generation_tokens
                stats.prompt_tps = response.prompt_tps
                stats.generation_tps = response.generation_tps
                stats.finish_reason = response.finish_reason
                if response.text:
                    self.text += response.text
                    yield response.text
        except GenerationStopped:
            stats.finish_reason = "cancelled"
        finally:
            # Ends mlx-lm's loop now (its wired-limit context syncs), before the caller releases the model.
            close = getattr(responses, "close", None)
            if close is not None:
                close()
            stats.seconds = time.perf_counter() - started
            stats.peak_memory_bytes = int(mx.get_peak_memory())
            if stats.finish_reason is None:
                stats.finish_reason = "interrupted"


class TextGeneration(StreamingGeneration):
    """Text generation with mlx-lm's ``stream_generate`` on a text model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tokens: list[int],
        request: GenerationRequest,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(request, should_stop)
        self.model, self.tokenizer, self.tokens = model, tokenizer, tokens
        self.stats.prompt_tokens = len(tokens)

    def _prefill_progress(self, done: int, total: int) -> None:
        """mlx-lm calls this before the first prompt chunk and after each: where a long prefill stops."""
        self.stats.prefilled_tokens = done
        if self.should_stop():
            raise GenerationStopped

    def responses(self) -> Iterator[Any]:
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        sampler = make_sampler(temp=self.request.temperature, top_p=self.request.top_p)
        return iter(
            stream_generate(
                self.model,
                self.tokenizer,
                self.tokens,
                max_tokens=self.request.max_tokens,
                sampler=sampler,
                prefill_step_size=PREFILL_STEP_TOKENS,
                prompt_progress_callback=self._prefill_progress,
            )
        )
