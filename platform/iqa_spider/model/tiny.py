"""Tiny random-initialised Qwen-VL models of the real classes, saved as ordinary HF directories.

Tests and the demo cannot download weights, so the project makes its own checkpoint:
the real ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` with a
few-layer config, the tokenizer trained by :mod:`iqa_spider.model.tokenizer`, the real
``Qwen2VLImageProcessor`` and video processor, and the real processor class with a Qwen-form
chat template. The directory loads with ``AutoModelForImageTextToText`` and ``AutoProcessor``
like any released checkpoint; nothing downstream needs to know it is tiny.

Images are kept small (area between ``MIN_PIXELS`` and ``MAX_PIXELS``, about 112..224 px a
side) through the image processor's ``size`` ``{"shortest_edge": min_pixels,
"longest_edge": max_pixels}``, which in transformers 5 are pixel *areas*, not side lengths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from iqa_spider.model.tokenizer import build_tokenizer

FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")

# Image area bounds of the tiny models' image processors (pixels): sides about 112..224.
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224

# Text model, shared by both families.
TEXT_HIDDEN = 64
TEXT_INTERMEDIATE = 128
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS  # 16; the rotary half is 8

# Vision tower.
VISION_HIDDEN = 32
VISION_INTERMEDIATE = 64
VISION_HEADS = 2

# Init std of the output head (the model's own initialiser uses 0.02). A released checkpoint's
# head spans logits of tens; a 64-wide head at 0.02 can reach only about +-1.3 (std * width),
# and the paper's recipe keeps the head frozen, so LoRA could never make the tiny model sure of
# any token: its loss stalled near ln(vocab) and it never learnt to write a position word.
# At 0.3 the reachable range is about +-19, like a pretrained head, and 400 CPU steps teach the
# grounding template (see BENCHMARKS.md, "Training quality").
LM_HEAD_STD = 0.3


def _round_to(value: int, factor: int, up: bool) -> int:
    q = -(-value // factor) if up else value // factor
    return max(1, q) * factor


def _pixel_bounds(patch_size: int, merge_size: int) -> tuple[int, int]:
    """MIN_PIXELS/MAX_PIXELS snapped to whole merged patches (factor = patch * merge)."""
    f2 = (patch_size * merge_size) ** 2
    return _round_to(MIN_PIXELS, f2, up=True), _round_to(MAX_PIXELS, f2, up=False)


def _token_ids(tok) -> dict[str, int]:
    ids = {
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    for name, value in ids.items():
        if not isinstance(value, int) or value < 0 or value >= len(tok):
            raise RuntimeError(f"tokenizer has no id for {name}: {value}")
    return ids


def tiny_config(family: str, vocab_size: int, token_ids: dict[str, int]):
    """The tiny model config of ``family``; token ids are set at top level and in text_config
    (transformers checks the text config's ``*_token_id`` against its vocab_size)."""
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config

        # Qwen2.5-VL-7B: mrope_section [16, 24, 24] over a rotary half of 64 -> [2, 3, 3] over 8.
        mrope_section = [2, 3, 3]
        text = dict(
            model_type="qwen2_5_vl_text",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            use_sliding_window=False,
            max_window_layers=TEXT_LAYERS,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
        )
        vision = dict(
            model_type="qwen2_5_vl_vision",
            depth=2,
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTERMEDIATE,
            num_heads=VISION_HEADS,
            hidden_act="silu",
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[1],  # layer 0 windowed, layer 1 full attention
            tokens_per_second=2,
            out_hidden_size=TEXT_HIDDEN,
        )
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config

        # Qwen3-VL: interleaved mrope [24, 20, 20] over a rotary half of 64 -> [4, 2, 2] over 8.
        mrope_section = [4, 2, 2]
        text = dict(
            model_type="qwen3_vl_text",
            head_dim=HEAD_DIM,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": mrope_section,
                "mrope_interleaved": True,
            },
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            attention_bias=False,
        )
        vision = dict(
            model_type="qwen3_vl_vision",
            depth=3,
            hidden_size=VISION_HIDDEN,
            intermediate_size=VISION_INTERMEDIATE,
            num_heads=VISION_HEADS,
            hidden_act="gelu_pytorch_tanh",
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=TEXT_HIDDEN,
            # a 16x16 grid of learned positions (interpolated to the image's patch grid,
            # at most 14x14 here); must be a square number
            num_position_embeddings=256,
            # deepstack features of vision layers 0 and 1 are added to text layers 0 and 1:
            # indexes must be < depth and their count <= the text layers
            deepstack_visual_indexes=[0, 1],
        )
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if sum(mrope_section) * 2 != HEAD_DIM:
        raise AssertionError("mrope sections must cover the rotary half of head_dim")
    text.update(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_INTERMEDIATE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=False,
        dtype="float32",
        **token_ids,
    )
    config = Config(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        dtype="float32",
        **token_ids,
    )
    return config


def _generation_config(token_ids: dict[str, int]):
    from transformers import GenerationConfig

    # Greedy by default so tiny-model runs are reproducible; callers pass their own settings.
    return GenerationConfig(
        bos_token_id=token_ids["bos_token_id"],
        eos_token_id=[token_ids["eos_token_id"], token_ids["bos_token_id"]],
        pad_token_id=token_ids["pad_token_id"],
        do_sample=False,
    )


def build_processor(family: str, tokenizer=None):
    """The real processor of ``family`` with small image bounds and the Qwen chat template."""
    from transformers import Qwen2VLImageProcessor

    if tokenizer is None:
        tokenizer = build_tokenizer(family)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
        from transformers import Qwen2VLVideoProcessor as VideoProcessor

        patch, mean, std = 14, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    elif family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor
        from transformers import Qwen3VLVideoProcessor as VideoProcessor

        patch, mean, std = 16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    lo, hi = _pixel_bounds(patch, 2)
    common: dict[str, Any] = dict(patch_size=patch, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std)
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": lo, "longest_edge": hi}, **common)
    # Qwen2-VL's video processor bounds each frame; Qwen3-VL's bounds frames x height x width.
    video_hi = hi if family == "qwen2_5_vl" else hi * 8
    video_processor = VideoProcessor(size={"shortest_edge": lo, "longest_edge": video_hi}, **common)
    return Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def init_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random ``family`` checkpoint (config, safetensors, tokenizer, processor,
    chat template, generation config) to ``out_dir`` and return its path.

    Deterministic: the same seed gives byte-identical ``model.safetensors``; the tokenizer does
    not depend on the seed.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family)
    token_ids = _token_ids(tokenizer)
    config = tiny_config(family, len(tokenizer), token_ids)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model

    # Random init with the model's own initialisers under a fixed seed; the global RNG
    # state of the caller is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config)
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=LM_HEAD_STD)
    model.generation_config = _generation_config(token_ids)
    model.eval()
    model.save_pretrained(out)
    build_processor(family, tokenizer).save_pretrained(out)
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
