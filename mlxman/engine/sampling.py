"""Per-row samplers: each row draws from its own random key; a seeded request repeats in any batch."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]


def row_sampler(temperature: float, top_p: float, seed: int | None) -> Sampler | None:
    """A sampler for one row, or None for greedy (the batch's shared argmax, one call for all greedy rows).

    mlx-lm's samplers draw from the process-wide random state, which every row of a batch advances in turn;
    here each row owns a key chain, so its draws depend only on its seed and its own logits.
    """
    if temperature == 0:
        return None
    key = mx.random.key(seed if seed is not None else secrets.randbits(63))
    inverse = 1.0 / temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, draw = mx.random.split(key)
        if 0 < top_p < 1.0:
            from mlx_lm.sample_utils import apply_top_p

            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * inverse, key=draw)

    return sample
