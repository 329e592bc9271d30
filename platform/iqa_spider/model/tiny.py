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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iqa_spider.model.tokenizer import build_tokenizer

FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")
# The released checkpoints' vision patch sides (pixels).
RELEASED_PATCH: dict[str, int] = {"qwen2_5_vl": 14, "qwen3_vl": 16}

# Image area bounds of the presets' image processors (pixels): sides about 112..224.
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224


@dataclass(frozen=True)
class Preset:
    """The sizes of one preset; both families take the same widths and depths."""

    text_hidden: int
    text_intermediate: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_depth: int  # Qwen2.5-VL; Qwen3-VL takes one more layer (its deepstack taps two)
    # Init std of the output head, or None for the model's own initialiser (0.02).
    lm_head_std: float | None
    # Vision patch side in pixels, or None for the family's released one (Qwen2.5-VL 14,
    # Qwen3-VL 16). The processor is built with the same, so a checkpoint stays consistent.
    vision_patch: int | None = None

    @property
    def head_dim(self) -> int:
        return self.text_hidden // self.text_heads


PRESETS: dict[str, Preset] = {
    # Fast tests and the pipeline's plumbing: about 0.2 M parameters.
    # Its head is initialised at std 0.3: a released checkpoint's head spans logits of tens; a
    # 64-wide head at 0.02 can reach only about +-1.3 (std * width), and the paper's LoRA recipe
    # keeps the head frozen, so LoRA could never make the tiny model sure of any token.
    "tiny": Preset(text_hidden=64, text_intermediate=128, text_layers=2, text_heads=4, text_kv_heads=2,
                   vision_hidden=32, vision_intermediate=64, vision_heads=2, vision_depth=2, lm_head_std=0.3),
    # A model that learns on 2 cores; trained with `method: full`, which trains the head too, so
    # it keeps the model's own initialiser. Its tower (the released patch, 128 wide, 4 deep) was
    # measured, as a Qwen2.5-VL (14 px patches), against a 7 px patch, a 256-wide, a 64-wide and a
    # 2-deep one in the same 6 minutes (bench/seeing.py --shapes, BENCHMARKS.md): bigger towers
    # get too few steps, smaller ones plateau lower, and this one named held-out whole-image
    # damage best. The same sizes as a Qwen3-VL (16 px patches, DEFAULT_FAMILY) name it about as
    # well (`make quality`'s first stage: 0.45, the Qwen2.5-VL's 0.38-0.47) and also learn where
    # it is (bench/seeing.py --task where).
    "small": Preset(text_hidden=256, text_intermediate=768, text_layers=4, text_heads=4, text_kv_heads=2,
                    vision_hidden=128, vision_intermediate=512, vision_heads=4, vision_depth=4, lm_head_std=None),
}
SIZES: tuple[str, ...] = tuple(PRESETS)

# The model class a preset is built of unless one is named. The small preset is a Qwen3-VL
# because the small Qwen2.5-VL cannot learn *where* anything is in the image, measured in
# bench/seeing.py --task where (BENCHMARKS.md): asked which quadrant is darkened or
# desaturated, it stays at chance after 5 minutes while the Qwen3-VL of the same sizes learns
# it. Two reasons in the classes themselves: the Qwen2.5-VL vision tower has no absolute
# positions (only relative RoPE), and its language model's multimodal RoPE gives the width
# axis the last, slowest frequencies, which with this preset's 64-wide heads and theta 1e6
# turn by 1.8e-4 to 1.5e-6 rad per token (height: 0.03 to 2.7e-4), too little to tell left
# from right. A released 7B learnt its positions from pre-training; a model from random init
# must learn them from our data, and Qwen3-VL's learned position embeddings and interleaved
# RoPE give it something to learn from. The tiny preset stays Qwen2.5-VL, the 7B recipes' class.
DEFAULT_FAMILY: dict[str, str] = {"tiny": "qwen2_5_vl", "small": "qwen3_vl"}


def family_for(size: str, family: str | None = None) -> str:
    """The class to build a preset in: the one named, else the size's own (DEFAULT_FAMILY)."""
    return family or DEFAULT_FAMILY[size]


# The tiny preset's sizes under their old names (tests and benchmarks read them).
TEXT_HIDDEN = PRESETS["tiny"].text_hidden
HEAD_DIM = PRESETS["tiny"].head_dim
LM_HEAD_STD = PRESETS["tiny"].lm_head_std


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


# Multimodal rotary sections (temporal, height, width) over the rotary half of head_dim.
# Qwen2.5-VL-7B: [16, 24, 24] over 64; Qwen3-VL (interleaved): [24, 20, 20] over 64. Scaled down
# in the same proportions to the presets' head widths.
MROPE_SECTIONS: dict[str, dict[int, list[int]]] = {
    "qwen2_5_vl": {16: [2, 3, 3], 64: [8, 12, 12]},
    "qwen3_vl": {16: [4, 2, 2], 64: [12, 10, 10]},
}


def preset_of(size: str | Preset) -> Preset:
    """A preset by name, or the given one (benchmarks compare shapes beside the named presets)."""
    if isinstance(size, Preset):
        return size
    if size not in PRESETS:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    return PRESETS[size]


def patch_of(family: str, preset: Preset) -> int:
    return preset.vision_patch or RELEASED_PATCH[family]


def tiny_config(family: str, vocab_size: int, token_ids: dict[str, int], size: str | Preset = "tiny"):
    """The config of preset ``size`` of ``family``; token ids are set at top level and in
    text_config (transformers checks the text config's ``*_token_id`` against its vocab_size)."""
    p = preset_of(size)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    mrope_section = MROPE_SECTIONS[family][p.head_dim]
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config

        text = dict(
            model_type="qwen2_5_vl_text",
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            use_sliding_window=False,
            max_window_layers=p.text_layers,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
        )
        vision = dict(
            model_type="qwen2_5_vl_vision",
            depth=p.vision_depth,
            hidden_size=p.vision_hidden,
            intermediate_size=p.vision_intermediate,
            num_heads=p.vision_heads,
            hidden_act="silu",
            patch_size=patch_of(family, p),
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            # odd layers full attention, even ones windowed (tiny: layer 0 windowed, 1 full),
            # as the 7B alternates windowed runs with full-attention layers
            fullatt_block_indexes=list(range(1, p.vision_depth, 2)),
            tokens_per_second=2,
            out_hidden_size=p.text_hidden,
        )
    elif family == "qwen3_vl":
        from transformers import Qwen3VLConfig as Config

        text = dict(
            model_type="qwen3_vl_text",
            head_dim=p.head_dim,
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
            depth=p.vision_depth + 1,
            hidden_size=p.vision_hidden,
            intermediate_size=p.vision_intermediate,
            num_heads=p.vision_heads,
            hidden_act="gelu_pytorch_tanh",
            patch_size=patch_of(family, p),
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=p.text_hidden,
            # a 16x16 grid of learned positions (interpolated to the image's patch grid,
            # at most 14x14 here); must be a square number
            num_position_embeddings=256,
            # deepstack features of vision layers 0..depth-2 are added to the first text layers:
            # indexes must be < depth and their count <= the text layers
            deepstack_visual_indexes=list(range(min(p.vision_depth, p.text_layers))),
        )
    if sum(mrope_section) * 2 != p.head_dim:
        raise AssertionError("mrope sections must cover the rotary half of head_dim")
    text.update(
        vocab_size=vocab_size,
        hidden_size=p.text_hidden,
        intermediate_size=p.text_intermediate,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_kv_heads,
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


def build_processor(family: str, tokenizer=None, patch: int | None = None):
    """The real processor of ``family`` with small image bounds and the Qwen chat template;
    ``patch`` must be the model's vision patch side (default: the family's released one)."""
    from transformers import Qwen2VLImageProcessor

    if tokenizer is None:
        tokenizer = build_tokenizer(family)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
        from transformers import Qwen2VLVideoProcessor as VideoProcessor

        mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    elif family == "qwen3_vl":
        from transformers import Qwen3VLProcessor as Processor
        from transformers import Qwen3VLVideoProcessor as VideoProcessor

        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    patch = patch or RELEASED_PATCH[family]
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


def init_tiny(family: str, out_dir: str | os.PathLike, seed: int = 0, size: str | Preset = "tiny") -> Path:
    """Write a random ``family`` checkpoint of preset ``size`` (a name, or a Preset) to ``out_dir``
    (config, safetensors, tokenizer, processor, chat template, generation config); return its path.

    Deterministic: the same seed gives byte-identical ``model.safetensors``; the tokenizer does
    not depend on the seed.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    preset = preset_of(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(family)
    token_ids = _token_ids(tokenizer)
    config = tiny_config(family, len(tokenizer), token_ids, preset)
    head_std = preset.lm_head_std
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model

    # Random init with the model's own initialisers under a fixed seed; the global RNG
    # state of the caller is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Model(config)
        if head_std is not None:
            torch.nn.init.normal_(model.get_output_embeddings().weight, std=head_std)
    model.generation_config = _generation_config(token_ids)
    model.eval()
    model.save_pretrained(out)
    build_processor(family, tokenizer, patch_of(family, preset)).save_pretrained(out)
    return out


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
