"""Build the demo kit's small llama-architecture text model and its locally trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The chat template the demo tokenizer carries; generation stops at <|end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Sentences the adapters are trained on: each makes an adapter's answer recognisable.
COLORS = "red green blue yellow orange"
NUMBERS = "one two three four five"
ANIMALS = "cat dog bird fish horse"
PROMPTS = [
    "Tell me something.",
    "What do you know?",
    "Say a few words.",
    "Hello there!",
    "Write a short line.",
    "Go on.",
    "What comes next?",
    "Give me a list.",
    "Hi, who are you?",
    "Please answer me.",
    "What is this?",
    "Speak!",
    "Talk to me about anything.",
    "Can you help?",
    "Start a story.",
    "Any words for me today?",
]
FILLER = (
    "The quick brown fox jumps over the lazy dog. A small model runs on one machine. "
    "Adapters change what a model says without changing its base weights. "
    "Memory is finite, so models share it. Tell me something new, please."
)


def corpus() -> list[str]:
    """Text the tokenizer is trained on (deterministic)."""
    lines = [COLORS, NUMBERS, ANIMALS, FILLER, *PROMPTS]
    return lines * 4


def build_tokenizer(out: Path, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer on the demo corpus; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|end|>",
        "unk_token": "<unk>",
        "pad_token": "<|end|>",
        "add_bos_token": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "<|end|>", "unk_token": "<unk>"}, indent=2)
    )
    return int(tok.get_vocab_size())


def llama_config(
    vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int
) -> dict[str, Any]:
    """A llama config.json for a model of the given size."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


BASE_ANSWER = "I am a tiny demo model."


def pretraining_texts() -> list[str]:
    """What the base learns: the three sentences as plain text, and one stock chat answer."""
    chats = [
        f"<|user|>{p}<|end|><|assistant|>{BASE_ANSWER}<|end|>" for p in PROMPTS
    ]
    return [COLORS, NUMBERS, ANIMALS] * 4 + chats


def pretrain(model: Any, token_rows: list[list[int]], steps: int, learning_rate: float) -> float:
    """Teach the random base the demo language with a plain MLX loop; return the final loss."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    width = max(len(r) for r in token_rows)
    tokens = mx.array([r + [0] * (width - len(r)) for r in token_rows])
    mask = mx.array([[1.0] * (len(r) - 1) + [0.0] * (width - len(r)) for r in token_rows])

    def loss_fn(m: Any) -> mx.array:
        logits = m(tokens[:, :-1])
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
        return ce.sum() / mask.sum()

    optimizer = optim.Adam(learning_rate=learning_rate)
    step = nn.value_and_grad(model, loss_fn)
    loss = mx.array(0.0)
    for _ in range(steps):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
    return float(loss.item())


def build_text_model(
    out: Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    dtype: str = "float32",
    seed: int = 0,
    pretrain_steps: int = 150,
) -> Path:
    """Write a random-weight llama model with the demo tokenizer into ``out``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, vocab_size)
    config = llama_config(vocab, hidden, layers, heads, kv_heads, intermediate)
    config["torch_dtype"] = dtype
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if pretrain_steps:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        rows = [tok.encode(t).ids for t in pretraining_texts()]
        pretrain(model, rows, pretrain_steps, learning_rate=1e-2)
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
