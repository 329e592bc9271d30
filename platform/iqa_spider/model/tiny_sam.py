"""A tiny random-initialised SAM of the real classes, saved as an ordinary HF directory.

Tests, the demo and the annotation job's ``regions.method=sam`` cannot download SAM
weights, so the project makes its own: the real ``SamModel`` with a few-layer
``SamConfig`` (ViT of hidden size 32, 2 layers, 128 px input, 16 px patches -> an 8x8
image embedding; prompt encoder and two-way mask decoder of width 32) and the real
``SamProcessor`` / ``SamImageProcessor`` resized to match (longest edge 128, padded to
128x128). The directory loads with ``SamModel.from_pretrained``, ``SamProcessor.from_pretrained``
and ``transformers.pipeline("mask-generation", model=DIR)`` like a released checkpoint.

Its masks are random, of course: it exists to exercise the real code paths (prompt in,
mask of the image's size out) in seconds on a CPU.
"""
from __future__ import annotations

import os
from pathlib import Path

IMAGE_SIZE = 128     # model input side (the processor resizes the longest edge to this and pads)
PATCH_SIZE = 16      # -> 8x8 image embedding, 32x32 low-resolution masks
HIDDEN = 32          # vision width = prompt/mask-decoder width = vision output channels
VISION_LAYERS = 2
HEADS = 2


def tiny_sam_config():
    from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig

    vision = SamVisionConfig(
        hidden_size=HIDDEN, output_channels=HIDDEN, num_hidden_layers=VISION_LAYERS,
        num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, mlp_dim=2 * HIDDEN,
        window_size=4, global_attn_indexes=[VISION_LAYERS - 1],
        # The positional encoding of points is shared with the prompt encoder: 2 * feats = width.
        num_pos_feats=HIDDEN // 2,
        # The default (1e-10) suits a checkpoint that is loaded over it, not a random one.
        initializer_range=0.02,
    )
    prompt = SamPromptEncoderConfig(hidden_size=HIDDEN, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                    mask_input_channels=8)
    decoder = SamMaskDecoderConfig(hidden_size=HIDDEN, mlp_dim=2 * HIDDEN, num_hidden_layers=2,
                                   num_attention_heads=HEADS, iou_head_hidden_dim=HIDDEN)
    return SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                     mask_decoder_config=decoder.to_dict())


def tiny_sam_processor():
    from transformers import SamImageProcessor, SamProcessor

    low_res = 4 * (IMAGE_SIZE // PATCH_SIZE)  # the mask decoder upsamples the embedding 4x
    image_processor = SamImageProcessor(
        size={"longest_edge": IMAGE_SIZE}, pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        mask_size={"longest_edge": low_res}, mask_pad_size={"height": low_res, "width": low_res},
    )
    return SamProcessor(image_processor=image_processor)


def init_tiny_sam(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random SAM (config, safetensors, processor) to ``out_dir``; return its path.

    Deterministic: the same seed gives the same weights. The caller's global torch RNG
    state is left as it was.
    """
    import torch
    from transformers import SamModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(tiny_sam_config())
    model.eval()
    model.save_pretrained(out)
    tiny_sam_processor().save_pretrained(out)
    return out


__all__ = ["init_tiny_sam", "tiny_sam_config", "tiny_sam_processor", "IMAGE_SIZE"]
