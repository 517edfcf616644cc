"""The serving engine: runs requests on a resident base, batching rows with different adapters together.

- ``scheduler``: ``Engine``, one long-lived thread per base running continuous batching: submit, cancel.
- ``slots``: ``SlotBank``, per-row LoRA slots on the base (which adapters can use one, and their memory).
- ``batching``: the only code that relies on mlx-lm's ``BatchGenerator`` internals.
- ``rows``: a request's ``Submission``, the caller's ``Ticket``, and its text, stops and stats.
- ``events``: Started / Piece / Finished / Failed and the text stop matcher. ``sampling``: per-row samplers.

What batches: plain-base requests and LoRA adapters on Linear or QuantizedLinear layers up to the slot rank,
greedy or sampled (each row has its own random key, so seeded requests repeat in any batch). What runs with
the adapter swapped in, its queued requests together after the batch drains: DoRA, a rank above the slot
maximum, adapters on embeddings or other module types. Models whose KV caches cannot merge get no engine.
"""
