"""Build the demo kit's tiny PaliGemma vision-language model (random weights, local tokenizer) for mlx-vlm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Why PaliGemma and not LLaVA: mlx-vlm's LlavaProcessor forwards every keyword it gets, `padding=True`
# included, to the image processor, and transformers 5's image processors validate their keywords, so every
# LLaVA prompt with an image fails with "ImagesKwargs.__init__() got an unexpected keyword argument
# 'padding'". mlx-vlm's PaliGemmaProcessor passes the image processor only the keywords it declares.

TEXT_HIDDEN = 64
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 1
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
TEXT_INTERMEDIATE = 128
VISION_HIDDEN = 32
VISION_LAYERS = 2
VISION_HEADS = 2
VISION_INTERMEDIATE = 64
IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SEED = 1
WEIGHT_STD = 0.5
# Order fixes the ids: <pad> must be 0, which PaliGemma masks out of the text embeddings.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
PAD_ID, EOS_ID, BOS_ID, IMAGE_ID = 0, 1, 2, 4
# Byte-level spellings of what the random model is allowed to say ("Ġ" is the space byte).
VISIBLE = "abcdefghijklmnopqrstuvwxyzĠ"


def build_tokenizer(out: Path) -> dict[str, int]:
    """Write a byte-level tokenizer (special tokens + the 256 bytes); return its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # No learnt merges: the tokenizers BPE trainer breaks ties in hash-map order, so its vocabulary changed
    # from build to build; the bare byte alphabet is fixed and still encodes any text.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "processor_class": "PaliGemmaProcessor",
        "model_max_length": 512,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return vocab


def paligemma_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "vocab_size": vocab_size,
        "image_token_index": IMAGE_ID,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID],
        "hidden_size": TEXT_HIDDEN,
        "projection_dim": TEXT_HIDDEN,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "gemma",
            "hidden_size": TEXT_HIDDEN,
            "num_hidden_layers": TEXT_LAYERS,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "head_dim": HEAD_DIM,
            "vocab_size": vocab_size,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 512,
            "num_image_tokens": IMAGE_TOKENS,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": VISION_HIDDEN,
            "num_hidden_layers": VISION_LAYERS,
            "intermediate_size": VISION_INTERMEDIATE,
            "num_attention_heads": VISION_HEADS,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "num_channels": 3,
            "projection_dim": TEXT_HIDDEN,
            "layer_norm_eps": 1e-6,
        },
    }


def preprocessor_config() -> dict[str, Any]:
    return {
        "image_processor_type": "SiglipImageProcessor",
        "processor_class": "PaliGemmaProcessor",
        # PaliGemmaProcessor expands one <image> into this many tokens: it must equal the vision patch count.
        "image_seq_length": IMAGE_TOKENS,
        "do_resize": True,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }


def paligemma_weight_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Every tensor mlx-vlm's paligemma loads (strictly), in the layout it keeps after its sanitize."""
    h, kv, i = TEXT_HIDDEN, TEXT_KV_HEADS * HEAD_DIM, TEXT_INTERMEDIATE
    vh, vi = VISION_HIDDEN, VISION_INTERMEDIATE
    lm, vm = "language_model.model", "vision_tower.vision_model"
    shapes: dict[str, tuple[int, ...]] = {
        f"{lm}.embed_tokens.weight": (vocab_size, h),
        f"{lm}.norm.weight": (h,),
        # MLX conv layout (out, kH, kW, in): the sanitize leaves it alone, as it would transpose PyTorch's.
        f"{vm}.embeddings.patch_embedding.weight": (vh, PATCH_SIZE, PATCH_SIZE, 3),
        f"{vm}.embeddings.patch_embedding.bias": (vh,),
        f"{vm}.embeddings.position_embedding.weight": (IMAGE_TOKENS, vh),
        f"{vm}.post_layernorm.weight": (vh,),
        f"{vm}.post_layernorm.bias": (vh,),
        "multi_modal_projector.linear.weight": (h, vh),
        "multi_modal_projector.linear.bias": (h,),
    }
    text_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (TEXT_HEADS * HEAD_DIM, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, TEXT_HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    vision_layer = {
        "layer_norm1.weight": (vh,),
        "layer_norm1.bias": (vh,),
        "layer_norm2.weight": (vh,),
        "layer_norm2.bias": (vh,),
        "mlp.fc1.weight": (vi, vh),
        "mlp.fc1.bias": (vi,),
        "mlp.fc2.weight": (vh, vi),
        "mlp.fc2.bias": (vh,),
    }
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        vision_layer[f"self_attn.{proj}.weight"] = (vh, vh)
        vision_layer[f"self_attn.{proj}.bias"] = (vh,)
    for n in range(TEXT_LAYERS):
        shapes.update({f"{lm}.layers.{n}.{k}": v for k, v in text_layer.items()})
    for n in range(VISION_LAYERS):
        shapes.update({f"{vm}.encoder.layers.{n}.{k}": v for k, v in vision_layer.items()})
    return shapes


def build_vision_model(out: Path) -> Path:
    """Write a tiny PaliGemma (SigLIP vision tower + Gemma decoder) to ``out`` and return ``out``."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out)
    vocab_size = len(vocab)
    (out / "config.json").write_text(json.dumps(paligemma_config(vocab_size), indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    processor = {
        "processor_class": "PaliGemmaProcessor",
        "image_seq_length": IMAGE_TOKENS,
        "image_token": "<image>",
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))

    # Weights are built by name rather than by instantiating mlx-vlm's model: that import costs ~2.4 s.
    key = mx.random.key(SEED)
    weights: dict[str, mx.array] = {}
    for name, shape in sorted(paligemma_weight_shapes(vocab_size).items()):
        key, sub = mx.random.split(key)
        if name.startswith("language_model") and "norm" in name:
            # Gemma's RMSNorm scales by (1 + weight): zeros are the identity.
            weights[name] = mx.zeros(shape)
        elif "layernorm" in name or "layer_norm" in name:
            weights[name] = mx.ones(shape) if name.endswith(".weight") else mx.zeros(shape)
        elif name.endswith(".bias"):
            weights[name] = mx.zeros(shape)
        else:
            # Large enough that the image, not just the last prompt token, steers what the model says.
            weights[name] = mx.random.normal(shape, key=sub) * WEIGHT_STD
    # The output head is the (tied) embedding: shrinking every row but lowercase letters and space keeps
    # greedy output to readable letters, and keeps <eos> from ending a generation early.
    readable = mx.array([vocab[c] for c in VISIBLE])
    row_scale = mx.full((vocab_size, 1), 0.05).at[readable].add(0.95)
    embed = "language_model.model.embed_tokens.weight"
    weights[embed] = weights[embed] * row_scale
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out
