"""COCO RLE for masks, the format every mask in datasets and results is stored in.

A mask is stored as {"size": [height, width], "counts": "<COCO compressed string>"}, the
exact form pycocotools, the COCO API and most segmentation tooling read.
"""
from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask


def encode(mask: np.ndarray) -> dict:
    """Binary HxW mask -> {"size": [h, w], "counts": str}."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8, copy=False)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    """{"size", "counts"} -> bool HxW mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    raw = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(raw).astype(bool)


def area(rle: dict) -> int:
    h, w = (int(v) for v in rle["size"])
    return int(coco_mask.area({"size": [h, w], "counts": rle["counts"].encode("ascii")}))


def bbox_normalized(mask: np.ndarray) -> list[float] | None:
    """(x0, y0, x1, y1) in 0..1 of the mask's extent; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return [float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w, float(ys.max() + 1) / h]
