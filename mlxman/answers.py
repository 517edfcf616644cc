"""One-shot answers through a pool: what ``generate`` and ``demo`` run for each model+adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxman.errors import UsageError
from mlxman.generate import GenerationRequest, GenerationStats, TextGeneration, fit_context, prompt_tokens
from mlxman.memory import resolve_budget, system_memory
from mlxman.pool import Hold, ModelPool
from mlxman.settings import load_config, resolve_pool_limits

CONTEXT_HINT = "shorten the prompt, lower --max-tokens, or raise --context-length"


@contextmanager
def open_pool(
    memory_limit: str | None, context_length: int | None = None, max_models: int | None = None
) -> Iterator[ModelPool]:
    """A pool for one command: it keeps what it loads until the command ends, then frees it all."""
    config = load_config()
    budget = resolve_budget(memory_limit, config, system_memory().total)
    limits = resolve_pool_limits(context_length, max_models, config)
    pool = ModelPool(
        budget.limit_bytes,
        keep_alive=-1,
        context_tokens=limits.context_tokens,
        max_models=limits.max_models,
    )
    try:
        yield pool
    finally:
        pool.close()


@dataclass
class Answer:
    """One model(+adapter) answer with its timings, filled in as it is generated."""

    model: str
    adapter: str | None
    key: str = ""
    kind: str = ""
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    load_seconds: float = 0.0
    swap_seconds: float = 0.0
    base_was_resident: bool = False

    @property
    def label(self) -> str:
        # A name (``mlxman alias``) may bring its own adapter: the key says which one ran.
        adapter = self.adapter or self.key.partition("::")[2]
        return Path(adapter).name if adapter else "base"

    def as_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "model": self.model,
            "adapter": self.adapter,
            "key": self.key,
            "kind": self.kind,
            "text": self.text,
            "finish_reason": s.finish_reason,
            "prompt_tokens": s.prompt_tokens,
            "generation_tokens": s.generation_tokens,
            "prompt_tps": s.prompt_tps,
            "generation_tps": s.generation_tps,
            "time_to_first_token": s.time_to_first_token,
            "generation_seconds": s.seconds,
            "load_seconds": self.load_seconds,
            "swap_seconds": self.swap_seconds,
            "base_was_resident": self.base_was_resident,
            "peak_memory_bytes": s.peak_memory_bytes,
        }


def run_answer(
    pool: ModelPool,
    answer: Answer,
    request: GenerationRequest,
    on_text: Callable[[str], None] | None = None,
) -> Answer:
    """Acquire the model+adapter from the pool and generate; ``on_text`` sees each piece as it comes."""
    with pool.acquire(answer.model, answer.adapter) as lease:
        answer.key, answer.kind = lease.key, lease.kind
        answer.load_seconds, answer.swap_seconds = lease.load_seconds, lease.swap_seconds
        answer.base_was_resident = lease.base_was_resident
        generation = _generation_for(lease, request, lease.context_tokens)
        answer.stats = generation.stats
        for piece in generation:
            answer.text += piece
            if on_text is not None:
                on_text(piece)
    return answer


def run_batch(pool: ModelPool, answers: list[Answer], request: GenerationRequest) -> bool:
    """Run every answer as one batch on an engine over their shared base: each adapter in its own slot (or
    swapped in, alone, when it cannot use one). False, with nothing run, when they cannot batch: different
    bases, or a model that is not text or whose caches cannot merge."""
    from mlxman.engine.batching import cannot_batch
    from mlxman.engine.hosting import PoolGrant
    from mlxman.engine.rows import Submission
    from mlxman.engine.scheduler import Engine, EngineConfig
    from mlxman.engine.slots import SlotBank

    holds: list[Hold] = []
    try:
        for answer in answers:
            holds.append(pool.hold(answer.model, answer.adapter))
        first = holds[0]
        if {h.base_key for h in holds} != {first.base_key} or first.kind != "text" or request.images:
            return False
        if cannot_batch(first.model) is not None:
            return False
        tokens = fit_context(
            prompt_tokens(first.tokenizer, request), request, first.context_tokens, CONTEXT_HINT
        )
        bank = SlotBank(first.model, slots=len(holds))
        config = EngineConfig(
            kv_bytes_per_token=first.kv_bytes_per_token, admission_timeout=pool.admission_timeout
        )
        grant = PoolGrant(pool, first.base_key, bank)
        engine = Engine(
            first.model, first.tokenizer, bank=bank, config=config, grant=grant, name=first.base_key
        )
        try:
            tickets = [engine.submit(Submission(tokens, request, h.adapter)) for h in holds]
            for answer, hold, ticket in zip(answers, holds, tickets, strict=True):
                answer.key, answer.kind = hold.key, hold.kind
                answer.load_seconds, answer.base_was_resident = hold.load_seconds, hold.base_was_resident
                answer.text, finished = ticket.result()
                answer.stats = finished.stats
        finally:
            engine.close()
            bank.detach()  # the base's own linears back: the pool may swap adapters on it later
        return True
    finally:
        for hold in holds:
            hold.release()


def _generation_for(lease: Any, request: GenerationRequest, context_tokens: int) -> Any:
    if lease.kind == "embeddings":
        raise UsageError(
            f"{lease.key} is an embeddings model and cannot generate text",
            f"use `mlxman embed --model {lease.key} TEXT...`",
        )
    if lease.kind == "vision":
        from mlxman.vision import VisionGeneration

        return VisionGeneration(lease.model, lease.tokenizer, request)
    if request.images:
        raise UsageError(f"--image needs a vision model, but {lease.key} is a text model", "drop --image")
    tokens = fit_context(prompt_tokens(lease.tokenizer, request), request, context_tokens, CONTEXT_HINT)
    return TextGeneration(lease.model, lease.tokenizer, tokens, request)
