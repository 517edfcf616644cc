"""Build the demo kit's tiny BERT embeddings model (random weights, local WordPiece vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 128
TYPE_VOCAB = 2
SEED = 1234
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# A fixed corpus keeps the vocabulary, and so every token id, identical on every build.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model runs on one machine and answers quickly.",
    "Embeddings turn sentences into vectors that can be compared.",
    "Similar sentences should land near each other in vector space.",
    "Search finds documents whose vectors are close to the query.",
    "red green blue yellow orange",
    "one two three four five",
    "cat dog bird fish horse",
    "Memory is finite, so models share it.",
    "Adapters change what a model says without changing its base weights.",
    "Hello there! What is this? Tell me something new, please.",
]


def wordpiece_vocab() -> dict[str, int]:
    """A WordPiece vocabulary learnt from the fixed corpus: specials, every character, then whole words.

    The ``tokenizers`` WordPiece trainer breaks frequency ties in hash-map order, so two builds got different
    vocabularies; counting words ourselves (ties broken alphabetically) keeps every build byte-identical.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in CORPUS:
        counts.update(word for word, _span in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for word in counts for c in word})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars), *words]
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(out: Path) -> int:
    """Write a lowercase WordPiece tokenizer for the fixed corpus; return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece(wordpiece_vocab(), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab()
    # vocab.txt lets the slow BertTokenizer (and other tools) read the vocabulary too.
    (out / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])))
    specials = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": MAX_POSITIONS,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return int(tok.get_vocab_size())


def bert_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": INTERMEDIATE,
        "hidden_act": "gelu",
        "max_position_embeddings": MAX_POSITIONS,
        "type_vocab_size": TYPE_VOCAB,
        "vocab_size": vocab_size,
        "layer_norm_eps": 1e-12,
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def bert_weight_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF ``BertModel`` (the names mlx-embeddings' bert keeps after its sanitize)."""
    h, i = HIDDEN, INTERMEDIATE
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab_size, h),
        "embeddings.position_embeddings.weight": (MAX_POSITIONS, h),
        "embeddings.token_type_embeddings.weight": (TYPE_VOCAB, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    linears = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (i, h),
        "output.dense": (h, i),
    }
    for n in range(LAYERS):
        prefix = f"encoder.layer.{n}"
        for name, shape in linears.items():
            shapes[f"{prefix}.{name}.weight"] = shape
            shapes[f"{prefix}.{name}.bias"] = (shape[0],)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{prefix}.{norm}.weight"] = (h,)
            shapes[f"{prefix}.{norm}.bias"] = (h,)
    return shapes


def build_embeddings_model(out: Path) -> Path:
    """Write a tiny sentence-transformers style BERT to ``out`` and return ``out``."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(out)
    (out / "config.json").write_text(json.dumps(bert_config(vocab_size), indent=2))

    # Weights are built here rather than by instantiating mlx-embeddings' model: that import costs ~2.4 s.
    key = mx.random.key(SEED)
    weights: dict[str, mx.array] = {}
    for name, shape in sorted(bert_weight_shapes(vocab_size).items()):
        key, sub = mx.random.split(key)
        if "LayerNorm.weight" in name:
            weights[name] = mx.ones(shape)
        elif name.endswith(".bias"):
            weights[name] = mx.zeros(shape)
        else:
            # Larger than BERT's 0.02 init so that different texts give clearly different vectors.
            weights[name] = mx.random.normal(shape, key=sub) * 0.5
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})

    # sentence-transformers layout: how tools (and mlxman's kind detection) recognise an embeddings model.
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling = out / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (pooling / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": MAX_POSITIONS, "do_lower_case": False}, indent=2)
    )
    return out
