"""The prefix cache: a later turn reuses the KV of an earlier one on its adapter, and answers the same."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from mlxman.demo import DemoKit
from mlxman.engine.rows import Submission
from mlxman.engine.scheduler import Engine, EngineConfig
from mlxman.engine.slots import SlotBank
from mlxman.generate import GenerationRequest, prompt_tokens
from mlxman.pool.swap import AdapterWeights, read_adapter

SYSTEM = "You are a patient assistant who answers every question about colors and numbers at length. " * 4
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def adapters(demo_kit: DemoKit) -> dict[str, AdapterWeights]:
    return {name: read_adapter(demo_kit.adapters[name]) for name in ("colors", "numbers")}


def make_engine(model_dir: Path, prefix_cache_bytes: int) -> Engine:
    from mlx_lm import load

    model, tokenizer = load(str(model_dir))[:2]  # each engine's own: its slot bank wraps the model
    bank = SlotBank(model, slots=2, max_rank=8)
    return Engine(model, tokenizer, bank=bank, config=EngineConfig(prefix_cache_bytes=prefix_cache_bytes))


def ask(engine: Engine, tokens: Sequence[int], adapter: AdapterWeights | None) -> str:
    request = GenerationRequest(prompt="", max_tokens=MAX_TOKENS, temperature=0.0)
    text, finished = engine.submit(Submission(list(tokens), request, adapter)).result(timeout=120)
    assert finished.finish_reason == "length"
    return text


def turns(tokenizer: Any, first_answer: str) -> tuple[list[int], list[int]]:
    """A two-turn chat under a long system prompt: the second turn holds the first, its answer, a question."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]
    second = [
        *first,
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And a number?"},
    ]
    return (
        prompt_tokens(tokenizer, GenerationRequest(prompt="", messages=first)),
        prompt_tokens(tokenizer, GenerationRequest(prompt="", messages=second)),
    )


def two_turns(engine: Engine, adapter: AdapterWeights | None) -> tuple[str, list[int]]:
    first, _ = turns(engine.tokenizer, "")
    answer = ask(engine, first, adapter)
    _, second = turns(engine.tokenizer, answer)
    return ask(engine, second, adapter), second


@pytest.mark.parametrize("name", [None, "colors"])
def test_a_second_turn_reuses_the_first_turns_kv_and_answers_as_without_it(
    endless_model: Path, adapters: dict[str, AdapterWeights], name: str | None
) -> None:
    adapter = adapters[name] if name else None
    cached = make_engine(endless_model, 64 << 20)
    plain = make_engine(endless_model, 0)
    try:
        answer, second = two_turns(cached, adapter)
        status = cached.status()
        first, _ = turns(cached.tokenizer, "")
        # Turn two skipped at least the whole system prompt and first question.
        assert status.prefix_reused_tokens >= len(first) - 1
        assert status.prefix_entries >= 1 and status.prefix_bytes > 0
        assert answer == ask(plain, second, adapter)
        assert plain.status().prefix_reused_tokens == 0 and plain.status().prefix_bytes == 0
        # The same prompt again: all but its last token comes from the cache, and the answer is the same.
        assert ask(cached, second, adapter) == answer
        assert cached.status().prefix_reused_tokens - status.prefix_reused_tokens == len(second) - 1
    finally:
        cached.close()
        plain.close()


def test_a_request_on_another_adapter_never_reuses_its_kv(
    endless_model: Path, adapters: dict[str, AdapterWeights]
) -> None:
    cached = make_engine(endless_model, 64 << 20)
    plain = make_engine(endless_model, 0)
    try:
        first, _ = turns(cached.tokenizer, "")
        ask(cached, first, adapters["colors"])
        assert cached.status().prefix_entries == 1
        # Same tokens on another adapter, and on the plain base: nothing to reuse, answers as without a cache.
        for adapter in (adapters["numbers"], None):
            assert ask(cached, first, adapter) == ask(plain, first, adapter)
            assert cached.status().prefix_reused_tokens == 0
        # Back on the first adapter: its own entry is used.
        ask(cached, first, adapters["colors"])
        assert cached.status().prefix_reused_tokens == len(first) - 1
        assert ask(plain, first, adapters["colors"]) != ask(plain, first, adapters["numbers"])
    finally:
        cached.close()
        plain.close()


class Grant:
    """A memory budget: the engine's slots, rows' KV and prefix cache must stay under ``limit``."""

    def __init__(self, limit: int) -> None:
        self.ceiling = limit
        self.held = 0

    def resize(self, nbytes: int) -> bool:
        if nbytes > self.ceiling:
            return False
        self.held = nbytes
        return True


def test_the_prefix_cache_counts_in_the_grant_and_is_evicted_before_a_row_waits(
    endless_model: Path,
) -> None:
    from mlx_lm import load

    model, tokenizer = load(str(endless_model))[:2]
    per_token = 2 * 2 * 2 * 16 * 4  # keys and values, 2 layers, 2 KV heads, head_dim 16, float32
    one_row = 256 * per_token  # prompt + max_tokens fit one 256-token cache step
    grant = Grant(2 * one_row)  # two rows at once, with nothing else beside them
    engine = Engine(model, tokenizer, grant=grant, config=EngineConfig(kv_bytes_per_token=per_token))
    try:
        ask(engine, list(range(5, 25)), None)
        status = engine.status()
        assert status.prefix_entries == 1 and status.prefix_bytes == (20 + MAX_TOKENS) * per_token
        assert grant.held == status.prefix_bytes  # the row's KV left; the cache's stays accounted
        # Two rows that share nothing with it need all the room: the entry goes, and they run together
        # rather than one waiting for the other.
        request = GenerationRequest(prompt="", max_tokens=MAX_TOKENS, temperature=0.0)
        tickets = [engine.submit(Submission(list(range(s, s + 20)), request)) for s in (40, 80)]
        assert all(t.result(timeout=120)[1].finish_reason == "length" for t in tickets)
        after = engine.status()
        assert after.tokens - status.tokens == 2 * MAX_TOKENS
        assert after.decode_steps - status.decode_steps < 2 * MAX_TOKENS  # batched: some steps served both
        assert after.prefix_reused_tokens == 0
        assert grant.held == after.prefix_bytes <= int(grant.ceiling * 0.1)
    finally:
        engine.close()
