"""Train real adapters for the demo kit with mlx-lm's own trainer."""

from __future__ import annotations

import contextlib
import io
import json
import types
from collections.abc import Sequence
from pathlib import Path

from mlxman.demo.text import chat_prompts

# Every projection of every block: the kit's adapters double as realistic fixtures (attention and MLP
# tensors, in every layer) for the adapter tools and their tests.
LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def write_chat_data(folder: Path, answer: str) -> Path:
    """A train/valid set where every prompt is answered with ``answer``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]}
        for p in chat_prompts()
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n"
    (folder / "train.jsonl").write_text(text)
    (folder / "valid.jsonl").write_text(text)
    return folder


def train_adapter(
    model_path: Path,
    data: Path,
    out: Path,
    *,
    fine_tune_type: str = "lora",
    rank: int = 8,
    scale: float = 2.0,
    dropout: float = 0.0,
    keys: Sequence[str] = LORA_KEYS,
    iters: int = 220,
    batch_size: int = 4,
    num_layers: int = -1,
    learning_rate: float = 5e-3,
    warmup: int = 20,
    seed: int = 0,
) -> Path:
    """Train an adapter in-process with ``mlx_lm.lora`` and return its directory."""
    from mlx_lm import lora

    args = dict(lora.CONFIG_DEFAULTS)
    args.update(
        model=str(model_path),
        train=True,
        data=str(data),
        fine_tune_type=fine_tune_type,
        adapter_path=str(out),
        iters=iters,
        batch_size=batch_size,
        num_layers=num_layers,
        learning_rate=learning_rate,
        # On this 64-wide base a LoRA's attention deltas easily scramble the token order it relies on
        # ("one two two three ..."): a gentle rate, a warmup past Adam's first large steps and a cosine
        # decay to 5 % let it fit the sentence exactly (scale 20 or a flat 1e-2 did not).
        lr_schedule={
            "name": "cosine_decay",
            "warmup": warmup,
            "arguments": [learning_rate, iters - warmup, learning_rate / 20],
        },
        steps_per_report=iters,
        steps_per_eval=10 * iters,
        val_batches=1,
        save_every=10 * iters,
        seed=seed,
        lora_parameters={"rank": rank, "dropout": dropout, "scale": scale, "keys": list(keys)},
        max_seq_length=256,
        mask_prompt=True,
    )
    # The trainer narrates to stdout; the demo kit shows its own progress instead.
    with contextlib.redirect_stdout(io.StringIO()):
        lora.run(types.SimpleNamespace(**args))
    return out
