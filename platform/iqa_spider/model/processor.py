"""The Qwen-VL processor as every job uses it: the checkpoint's own, with optional resize bounds."""
from __future__ import annotations

from typing import Any


def load_processor(model_dir: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """AutoProcessor of `model_dir`; `min_pixels` / `max_pixels` (null: the checkpoint's own)
    bound the image resize, the same for training, inference and scoring."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    if min_pixels is not None or max_pixels is not None:
        size = dict(processor.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        processor.image_processor.size = size
    return processor


def processor_max_pixels(processor: Any) -> int | None:
    """The most pixels the image processor passes to the model (it resizes larger images down)."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    value = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
    return int(value) if value else None
