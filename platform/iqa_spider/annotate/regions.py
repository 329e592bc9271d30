"""Region proposals: where distortions can be applied. Three kinds behind one function.

- `superpixel` (default, no weights): SLIC superpixels, small pieces merged into their most
  similar neighbour until every region is a useful size, 3..12 regions per image.
- `masks`: the user's own masks (COCO RLE) that came with the image.
- `sam`: SAM automatic masks (transformers' mask-generation pipeline) from a local checkpoint.
A region without a semantic label is named by its position words by the writers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from skimage.segmentation import slic

log = logging.getLogger(__name__)


@dataclass
class Proposal:
    mask: np.ndarray  # bool HxW
    label: str | None = None


def superpixel_regions(image: np.ndarray, seed: int, min_regions: int = 3, max_regions: int = 12,
                       min_area_frac: float = 0.04) -> list[Proposal]:
    """SLIC superpixels merged by colour similarity into min_regions..max_regions parts."""
    h, w = image.shape[:2]
    if h * w < 64:
        return grid_regions(h, w, 2)
    # SLIC is deterministic (grid-seeded k-means), so `seed` is not needed here; it is kept
    # in the signature for proposal methods that sample.
    segments = slic(image, n_segments=max_regions * 3, compactness=12.0, start_label=0,
                    enforce_connectivity=True)
    labels = _merge_small(image, segments, min_area=max(1, int(min_area_frac * h * w)),
                          max_regions=max_regions)
    proposals = [Proposal(labels == k) for k in np.unique(labels)]
    proposals = [p for p in proposals if p.mask.any()]
    if len(proposals) < min_regions:  # a flat image: fall back to a grid of useful size
        return grid_regions(h, w, 2)
    proposals.sort(key=lambda p: -int(p.mask.sum()))
    return proposals


def _merge_small(image: np.ndarray, labels: np.ndarray, min_area: int, max_regions: int) -> np.ndarray:
    """Merge the smallest region into its most similar (mean colour) neighbour, repeatedly."""
    labels = labels.copy()
    flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if len(ids) <= 1:
            return labels
        smallest = int(np.argmin(counts))
        if counts[smallest] >= min_area and len(ids) <= max_regions:
            return labels
        k = ids[smallest]
        neighbours = _neighbours(labels, k)
        if not neighbours:
            return labels
        lab = labels.reshape(-1)
        mean_k = flat[lab == k].mean(axis=0)
        best = min(neighbours, key=lambda n: float(np.sum((flat[lab == n].mean(axis=0) - mean_k) ** 2)))
        labels[labels == k] = best


def _neighbours(labels: np.ndarray, k: int) -> set[int]:
    mask = labels == k
    ring = np.zeros_like(mask)
    ring[1:, :] |= mask[:-1, :]
    ring[:-1, :] |= mask[1:, :]
    ring[:, 1:] |= mask[:, :-1]
    ring[:, :-1] |= mask[:, 1:]
    ring &= ~mask
    return {int(v) for v in np.unique(labels[ring])}


def grid_regions(h: int, w: int, n: int) -> list[Proposal]:
    out = []
    for i in range(n):
        for j in range(n):
            m = np.zeros((h, w), bool)
            m[i * h // n:(i + 1) * h // n, j * w // n:(j + 1) * w // n] = True
            if m.any():
                out.append(Proposal(m))
    return out


def user_regions(masks: list[dict], h: int, w: int) -> list[Proposal]:
    """The user's masks: [{'mask_rle': {...}, 'label': str|None}], resized to the image if needed."""
    from iqa_spider.data import rle

    out = []
    for m in masks:
        mask = rle.decode(m["mask_rle"])
        if mask.shape != (h, w):
            from PIL import Image

            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
        if mask.any():
            out.append(Proposal(mask, m.get("label")))
    return out


class SamRegions:
    """SAM automatic masks from a local checkpoint (loaded once per worker)."""

    def __init__(self, path: str, max_regions: int = 12, min_area_frac: float = 0.02):
        from transformers import pipeline

        self.generator = pipeline("mask-generation", model=path, device="cpu")
        self.max_regions, self.min_area_frac = max_regions, min_area_frac

    def __call__(self, image: np.ndarray) -> list[Proposal]:
        from PIL import Image

        result = self.generator(Image.fromarray(image), points_per_batch=64)
        h, w = image.shape[:2]
        masks = [np.asarray(m, dtype=bool) for m in result["masks"]]
        masks = [m for m in masks if m.shape == (h, w) and m.mean() >= self.min_area_frac]
        masks.sort(key=lambda m: -int(m.sum()))
        return [Proposal(m) for m in masks[: self.max_regions]]
