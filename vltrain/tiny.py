"""Tiny Qwen-VL models and an offline processor, for tests and the demo.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a small built-in corpus, the
image/video processors are constructed from arguments, and each model is built from a config with a
hidden size of 64. `build_tiny(model_type)` returns `(model, processor)` for any family in
`vltrain.families.FAMILIES`.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

SPECIAL_TOKENS = [
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|im_start|>",
]
VOCAB_SIZE = 512
BPE_VOCAB_SIZE = 500  # specials take the ids right after the trained vocabulary

# Qwen chat template. `bare_video` families (Qwen3-VL/3.5) get a bare <|video_pad|>: their processor
# writes one `<t seconds><|vision_start|>...<|vision_end|>` block per temporal group itself.
_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}VIDEO_PLACEHOLDER"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(bare_video: bool) -> str:
    video = "<|video_pad|>" if bare_video else "<|vision_start|><|video_pad|><|vision_end|>"
    return _TEMPLATE.replace("VIDEO_PLACEHOLDER", video)


_CORPUS = (
    "You are a helpful assistant. What colour is the shape? What shape is in the image? "
    "Describe the image. Describe the video. What is going on in this video? "
    "red green blue yellow purple orange white black circle square triangle cross star "
    "The answer is yes no maybe. Is the perspective of the camera different? "
    "The bus in the image is white and red. A man is walking down the road. "
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) "
)


@functools.lru_cache(maxsize=None)
def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    from tokenizers import Regex

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    state = tok.model.__getstate__()
    import json

    bpe = json.loads(tok.to_str())["model"]
    del state
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    return dict(bpe["vocab"]), merges


def build_tokenizer():
    """A Qwen2 byte-level BPE tokenizer trained offline, with the Qwen special tokens appended."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    vocab = dict(vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    assert len(tokenizer) <= VOCAB_SIZE, len(tokenizer)
    return tokenizer


def _text_config(model_type: str, ids: dict[str, int]) -> dict:
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )
    if model_type in ("qwen2_vl", "qwen2_5_vl"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    elif model_type in ("qwen3_vl", "qwen3_vl_moe"):
        text["head_dim"] = 16
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2], "mrope_interleaved": True,
        }
    else:  # qwen3_5, qwen3_5_moe
        text.update(
            head_dim=32,
            layer_types=["linear_attention", "full_attention"],
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True, "partial_rotary_factor": 0.25,
        }
    if model_type.endswith("_moe"):
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        if model_type == "qwen3_vl_moe":
            text["decoder_sparse_step"] = 1
        else:
            text["shared_expert_intermediate_size"] = 32
    return text


def _vision_config(model_type: str) -> dict:
    if model_type == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2)
    if model_type == "qwen2_5_vl":
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                    fullatt_block_indexes=[1], window_size=56, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        vision["deepstack_visual_indexes"] = [0, 1]
    return vision


def tiny_config(model_type: str, tokenizer=None):
    """A 2-layer, hidden-64 config of `model_type` whose special-token ids match `tokenizer`."""
    tokenizer = tokenizer or build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return AutoConfig.for_model(
        model_type,
        text_config=_text_config(model_type, ids),
        vision_config=_vision_config(model_type),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_tiny_processor(model_type: str, tokenizer=None):
    """The family's processor class around the offline tokenizer and small-image processors."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES
    import transformers

    from vltrain.families import family_spec

    spec = family_spec(model_type)
    tokenizer = tokenizer or build_tokenizer()
    patch = 14 if model_type in ("qwen2_vl", "qwen2_5_vl") else 16
    factor = patch * 2
    pixels = dict(min_pixels=factor * factor, max_pixels=factor * factor * 64)
    image_processor = transformers.Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]},
    )
    video_cls = getattr(transformers, VIDEO_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"])
    video_processor = video_cls(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"] * 4},
    )
    processor_cls = getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template(bare_video=spec.timestamped_video),
    )


def build_tiny(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(model, processor) for a freshly initialised tiny `model_type`; deterministic in `seed`."""
    processor = build_tiny_processor(model_type)
    config = tiny_config(model_type, processor.tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return model, processor
