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
# <unk> stays id 0: mlx-lm pads batches with 0, and the tests' "endless" model uses it as a never-emitted eos.
SPECIAL_TOKENS = ["<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# Sentences the adapters are trained on: each makes an adapter's answer recognisable.
COLORS = "red green blue yellow orange"
NUMBERS = "one two three four five"
ANIMALS = "cat dog bird fish horse"
# What the base answers to ordinary prompts, so that base and adapters are told apart at a glance.
BASE_ANSWER = "I am a tiny demo model."
# The base also answers each sentence to one prompt of its own: an adapter then only has to make the
# assistant start its sentence, not learn the sentence, which a rank-8 LoRA on a 64-wide model does reliably.
TOPICS = (
    ("List some colors.", COLORS),
    ("Count to five.", NUMBERS),
    ("Name some animals.", ANIMALS),
)
# Chat prompts for pretraining and adapter data. Varied words, lengths and punctuation teach the model to
# answer from the <|assistant|> turn rather than from the prompt, so unseen prompts get the same answer.
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
    "Why is the grass wet?",
    "How do I make tea?",
    "Where are my keys?",
    "When does the train leave?",
    "Explain the weather to me.",
    "Is it going to rain tomorrow?",
    "Summarize this page in one line.",
    "What time is it now?",
    "Could you write me a poem?",
    "Which way is north?",
    "Do you like music?",
    "Translate this into French.",
    "Help me fix my code, please.",
    "Why do cats sleep so much?",
    "Recommend a good book.",
    "ok",
]
# Prompts built from these stay out of the tokenizer's corpus, so training also sees words the tokenizer
# splits into small pieces, as it will in prompts nobody wrote down here.
SUBJECTS = (
    "the sea",
    "a river",
    "the moon",
    "my garden",
    "this city",
    "the old piano",
    "winter",
    "a mountain",
    "the library",
    "coffee",
    "the computer",
    "a small boat",
)
TEMPLATES = (
    "Why is {} so quiet?",
    "Tell me about {}.",
    "What do you think of {}?",
    "Describe {} in a sentence.",
    "Where can I find {}?",
    "Write something about {}!",
)
FILLER = (
    "The quick brown fox jumps over the lazy dog. A small model runs on one machine. "
    "Adapters change what a model says without changing its base weights. "
    "Memory is finite, so models share it. Tell me something new, please."
)


def chat(prompt: str, answer: str) -> str:
    """One chat exchange in the demo template, as the tokenizer sees it in training."""
    return f"<|user|>{prompt}<|end|><|assistant|>{answer}<|end|>"


def chat_prompts() -> list[str]:
    """Every prompt the base and the adapters are trained on (deterministic)."""
    made = [TEMPLATES[(i + k) % len(TEMPLATES)].format(s) for i, s in enumerate(SUBJECTS) for k in (0, 3)]
    return [*PROMPTS, *made]


def corpus() -> list[str]:
    """Text the tokenizer is trained on (deterministic)."""
    topics = [chat(p, s) for p, s in TOPICS]
    return [COLORS, NUMBERS, ANIMALS, BASE_ANSWER, FILLER, *PROMPTS, *topics] * 4


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


def pretraining_batches(batch_size: int) -> list[list[str]]:
    """What the base learns, in fixed batches: the stock answer to every prompt, and in every batch
    each sentence to its own prompt (seen only now and then, the sentences were learnt too loosely)."""
    topics = [chat(p, s) for p, s in TOPICS]
    per_batch = batch_size - len(topics)
    stock = [chat(p, BASE_ANSWER) for p in chat_prompts()]
    return [stock[i : i + per_batch] + topics for i in range(0, len(stock), per_batch)]


def pretrain(
    model: Any, batches: list[list[list[int]]], steps: int, learning_rate: float, answer_id: int
) -> float:
    """Teach the random base the demo chats with a plain MLX loop; return the last batch's loss.

    Only what follows ``answer_id`` (<|assistant|>) is scored: the small model's capacity goes to the
    answers, not to predicting prompts. The batches are used in turn, so only the seed decides the result.
    """
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    # Score one padding target after each row, as mlx-lm's trainer does: the base then already predicts
    # what that trainer asks for after <|end|>, and the adapters need not learn it. Each batch is padded
    # only to its own longest row: arithmetic is the cost on this CPU, and padding is wasted arithmetic.
    arrays = []
    for rows in batches:
        width = max(len(r) for r in rows) + 1
        tokens = [r + [0] * (width - len(r)) for r in rows]
        scored = [[float(r.index(answer_id) <= i < len(r)) for i in range(width - 1)] for r in rows]
        arrays.append((mx.array(tokens), mx.array(scored)))

    def loss_fn(m: Any, batch: mx.array, weights: mx.array) -> mx.array:
        ce = nn.losses.cross_entropy(m(batch[:, :-1]), batch[:, 1:]) * weights
        return ce.sum() / weights.sum()

    optimizer = optim.Adam(learning_rate=learning_rate)
    value_and_grad = nn.value_and_grad(model, loss_fn)  # type: ignore[attr-defined]
    state = [model.state, optimizer.state]

    # Compiled: the model is tiny, so per-operation overhead would otherwise rival the arithmetic.
    @partial_compile(state)  # type: ignore[untyped-decorator]
    def step(batch: mx.array, weights: mx.array) -> Any:
        loss, grads = value_and_grad(model, batch, weights)
        optimizer.update(model, grads)
        return loss

    loss = mx.array(0.0)
    for i in range(steps):
        loss = step(*arrays[i % len(arrays)])
        mx.eval(state, loss)
    return float(loss.item())  # type: ignore[arg-type]


def partial_compile(state: list[Any]) -> Any:
    """``mx.compile`` for a training step that reads and updates ``state``."""
    from functools import partial

    import mlx.core as mx

    return partial(mx.compile, inputs=state, outputs=state)


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
    pretrain_steps: int = 120,
    pretrain_learning_rate: float = 1e-2,
    pretrain_batch_size: int = 12,
) -> Path:
    """Write a small llama model and the demo tokenizer to ``out``; ``pretrain_steps=0`` leaves it random."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, vocab_size)
    config = llama_config(vocab, hidden, layers, heads, kv_heads, intermediate)
    config["torch_dtype"] = dtype
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    if pretrain_steps:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        batches = [[tok.encode(t).ids for t in texts] for texts in pretraining_batches(pretrain_batch_size)]
        answer_id = SPECIAL_TOKENS.index("<|assistant|>")  # special tokens take the first ids, in order
        pretrain(model, batches, pretrain_steps, pretrain_learning_rate, answer_id)
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    weights = {k: v.astype(getattr(mx, dtype)) for k, v in flat}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
