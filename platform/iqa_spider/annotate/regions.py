"""Region proposals: where distortions can be applied. Four kinds behind one function.

- `superpixel` (default, no weights): SLIC superpixels, small pieces merged into their most
  similar neighbour until every region is a useful size, 3..12 regions per image.
- `masks`: the user's own masks (COCO RLE) that came with the image.
- `sam`: SAM automatic masks (transformers' mask-generation pipeline) from a local checkpoint.
- `grid`: the cells of the position vocabulary's grid (2x2 or 3x3): every region's position
  words name exactly the cell it covers, the cleanest data for learning positions.
A region without a semantic label is named by its position words by the writers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from skimage.segmentation import slic

from iqa_spider.annotate.truth import cell_edges
from iqa_spider.data import rle

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
    """Merge the smallest region into its most similar (mean colour) neighbour, repeatedly.

    Each region's pixel count and colour sum are kept and updated as regions merge rather
    than recomputed from the whole image at every step. The sums are of 8-bit values, exact
    in float64 in any order, so each mean (sum / count) is bit for bit what
    ``flat[labels == k].mean(axis=0)`` gives, and every merge is the one that gives.
    """
    labels = labels.copy()
    lab = labels.reshape(-1)
    flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
    size = int(lab.max()) + 1
    counts_all = np.bincount(lab, minlength=size)
    sums = np.stack([np.bincount(lab, weights=flat[:, c], minlength=size) for c in range(flat.shape[1])], axis=1)
    while True:
        ids = np.flatnonzero(counts_all)  # the labels present, ascending (as np.unique lists them)
        counts = counts_all[ids]
        if len(ids) <= 1:
            return labels
        smallest = int(np.argmin(counts))
        if counts[smallest] >= min_area and len(ids) <= max_regions:
            return labels
        k = int(ids[smallest])
        neighbours = _neighbours(labels, k)
        if not neighbours:
            return labels
        mean_k = sums[k] / counts_all[k]
        best = min(neighbours, key=lambda n: float(np.sum((sums[n] / counts_all[n] - mean_k) ** 2)))
        labels[labels == k] = best
        sums[best] += sums[k]
        counts_all[best] += counts_all[k]
        sums[k] = 0.0
        counts_all[k] = 0


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
    rows, cols = cell_edges(h, n), cell_edges(w, n)
    out = []
    for i in range(n):
        for j in range(n):
            m = np.zeros((h, w), bool)
            m[rows[i]:rows[i + 1], cols[j]:cols[j + 1]] = True
            if m.any():
                out.append(Proposal(m))
    return out


def user_regions(masks: list[dict], h: int, w: int) -> list[Proposal]:
    """The user's masks: [{'mask_rle': {...}, 'label': str|None}], resized to the image if needed."""

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
    """SAM automatic masks (transformers' mask-generation pipeline) from a local checkpoint,
    loaded once per worker, turned into disjoint regions.

    SAM's masks overlap (an object, its parts, the background around it), but a region's
    truth must hold for every pixel in it, so the masks are made disjoint: candidates that
    cover between `min_area_frac` and `max_area_frac` of the image are painted smallest
    first, each keeping only the pixels no smaller mask took and only its largest connected
    piece (position words describe one place); pieces that end up below `min_area_frac` are
    dropped, and the `max_regions` largest are returned, largest first. Pixels no region
    claims stay outside every region (they are never distorted by region variants).

    Two passes: first SAM's own filters (`pred_iou_thresh`, `stability_score_thresh`,
    box NMS at `nms_thresh`) on a `points_per_side`^2 grid. If that leaves fewer than
    `min_regions` regions and `relaxed_retry` is on, one more pass on a coarser grid
    (`relaxed_points_per_side`^2) without the quality filters or NMS keeps the model's
    candidates as they come; a checkpoint whose confidence is uncalibrated (the project's
    tiny random SAM, or a weak fine-tune) still yields regions this way. Fewer than
    `min_regions` after both passes: the caller falls back to superpixels.
    """

    def __init__(self, path: str, max_regions: int = 12, min_area_frac: float = 0.02, *,
                 min_regions: int = 3, max_area_frac: float = 0.95, points_per_side: int = 16,
                 points_per_batch: int = 64, pred_iou_thresh: float = 0.88,
                 stability_score_thresh: float = 0.95, nms_thresh: float = 0.7,
                 relaxed_retry: bool = True, relaxed_points_per_side: int = 4, device: str = "cpu"):
        from transformers import pipeline

        self.generator = pipeline("mask-generation", model=str(path), device=device)
        size = self.generator.image_processor.size
        self.work_side = int(size.get("longest_edge") or max(size.get("height", 1024), size.get("width", 1024)))
        self.max_regions, self.min_regions = max_regions, min_regions
        self.min_area_frac, self.max_area_frac = min_area_frac, max_area_frac
        self.points_per_batch = points_per_batch
        self.strict = {"points_per_crop": points_per_side, "pred_iou_thresh": pred_iou_thresh,
                       "stability_score_thresh": stability_score_thresh, "crops_nms_thresh": nms_thresh}
        self.relaxed = ({"points_per_crop": relaxed_points_per_side, "pred_iou_thresh": 0.0,
                         "stability_score_thresh": 0.0, "crops_nms_thresh": 1.0} if relaxed_retry else None)

    def masks(self, image: np.ndarray, **settings) -> list[np.ndarray]:
        """The pipeline's raw masks (bool HxW) for one RGB uint8 image.

        The model sees the image at its own input size whatever we pass, so an image larger
        than that is shrunk first and the masks are scaled back up: the same masks, without
        the pipeline's per-pixel post-processing (stability scores, RLE) at full size.
        """
        from PIL import Image

        h, w = image.shape[:2]
        pil = Image.fromarray(image)
        scale = self.work_side / max(h, w)
        if scale < 1:
            pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        result = self.generator(pil, points_per_batch=self.points_per_batch, **settings)
        out = []
        for m in result["masks"]:
            m = m.cpu().numpy() if hasattr(m, "cpu") else np.asarray(m)
            m = m.astype(bool, copy=False)
            if m.shape != (h, w):
                m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)) > 127
            out.append(m)
        return out

    def disjoint(self, masks: list[np.ndarray]) -> list[Proposal]:
        from skimage.measure import label as connected

        if not masks:
            return []
        h, w = masks[0].shape
        total = h * w
        min_px = max(1, int(self.min_area_frac * total))
        candidates = [m for m in masks if min_px <= int(m.sum()) <= self.max_area_frac * total]
        candidates.sort(key=lambda m: int(m.sum()))
        claimed = np.zeros((h, w), bool)
        pieces = []
        for m in candidates:
            free = m & ~claimed
            if int(free.sum()) < min_px:
                continue
            labels, n = connected(free, connectivity=1, return_num=True)
            if n > 1:
                sizes = np.bincount(labels.ravel())[1:]
                free = labels == (1 + int(np.argmax(sizes)))
            if int(free.sum()) < min_px:
                continue
            claimed |= free
            pieces.append(free)
        pieces.sort(key=lambda m: -int(m.sum()))
        return [Proposal(m) for m in pieces[: self.max_regions]]

    def __call__(self, image: np.ndarray) -> list[Proposal]:
        proposals = self.disjoint(self.masks(image, **self.strict))
        if len(proposals) < self.min_regions and self.relaxed is not None:
            relaxed = self.disjoint(self.masks(image, **self.relaxed))
            if len(relaxed) > len(proposals):
                log.debug("SAM: %d regions with its filters, %d without", len(proposals), len(relaxed))
                proposals = relaxed
        return proposals
