"""Segmenters: point prompts + image -> mask, behind one interface.

``Segmenter.segment(image, points) -> bool HxW`` (the union of one mask per point) and
``segment_many(image, point_sets)`` (one mask per set, sharing per-image work such as SAM's
image embedding or the superpixels). Kinds, in ``SEGMENTERS``:

- ``superpixel`` (offline default, no weights): SLIC superpixels of the image (computed once
  per image on a copy at most 256 px a side), then region growing from the superpixel under
  the point: neighbours join while their mean CIELAB colour is within ``colour_tol`` of the
  region's mean, closest first, and the mask stays between ``min_area_frac`` and
  ``max_area_frac`` of the image. It follows the object or region the point lands on.
- ``sam``: transformers ``SamModel`` / ``Sam2Model`` + processor from a local checkpoint; one
  image embedding per image, one decoder pass for all points, the best of the multimask
  outputs by predicted IoU.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from iqa_spider.model.loading import resolve_device

if TYPE_CHECKING:  # pragma: no cover
    from iqa_spider.infer.predictor import Grounding

PointXY = tuple[float, float]


class Segmenter:
    """Interface: subclasses implement ``segment_many``."""

    name = "base"

    def segment(self, image: Image.Image, points: Sequence[PointXY]) -> np.ndarray:
        """Bool mask of the image's size: the union of the masks of ``points`` (empty: all False)."""
        return self.segment_many(image, [list(points)])[0]

    def segment_many(self, image: Image.Image, point_sets: Sequence[Sequence[PointXY]]) -> list[np.ndarray]:
        raise NotImplementedError

    def attach_masks(self, image: Image.Image, groundings: Sequence[Grounding]) -> None:
        """Fill ``mask`` and ``masks`` of each grounding: the full image for a whole-image answer,
        else one mask per point (all points of the image in one call) and their union; None when
        the answer named no position."""
        todo = [(g, p) for g in groundings if not g.whole_image for p in g.points]
        masks = self.segment_many(image, [[(p.x, p.y)] for _, p in todo]) if todo else []
        for g in groundings:
            g.masks, g.mask = [], None
            if g.whole_image:
                g.mask = np.ones((image.height, image.width), dtype=bool)
        for (g, _), m in zip(todo, masks):
            g.masks.append(m)
            g.mask = m.copy() if g.mask is None else (g.mask | m)


def _pixel(point: PointXY, w: int, h: int) -> tuple[int, int]:
    x, y = point
    return int(min(max(round(x), 0), w - 1)), int(min(max(round(y), 0), h - 1))


class SuperpixelSegmenter(Segmenter):
    name = "superpixel"

    def __init__(self, n_segments: int = 200, colour_tol: float = 12.0, min_area_frac: float = 0.01,
                 max_area_frac: float = 0.5, work_side: int = 256, compactness: float = 10.0,
                 sigma: float = 1.0):
        self.n_segments, self.colour_tol = int(n_segments), float(colour_tol)
        self.min_area_frac, self.max_area_frac = float(min_area_frac), float(max_area_frac)
        self.work_side, self.compactness, self.sigma = int(work_side), float(compactness), float(sigma)

    def _superpixels(self, image: Image.Image) -> dict[str, Any]:
        from skimage.color import rgb2lab
        from skimage.segmentation import slic

        w, h = image.size
        scale = min(1.0, self.work_side / max(w, h))
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        small = image if scale >= 1.0 else image.resize((sw, sh), Image.Resampling.BILINEAR)
        arr = np.asarray(small.convert("RGB"))
        labels = slic(arr, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                      enforce_connectivity=True, convert2lab=True, sigma=self.sigma)
        k = int(labels.max()) + 1
        lab = rgb2lab(arr).reshape(-1, 3)
        flat = labels.reshape(-1)
        sizes = np.bincount(flat, minlength=k).astype(np.float64)
        means = np.stack([np.bincount(flat, weights=lab[:, c], minlength=k) for c in range(3)], 1)
        means /= np.maximum(sizes, 1)[:, None]
        adj: list[set[int]] = [set() for _ in range(k)]
        for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
            diff = a != b
            for u, v in set(zip(a[diff].tolist(), b[diff].tolist())):
                adj[u].add(v)
                adj[v].add(u)
        # full-resolution label map by nearest lookup
        rows = np.minimum((np.arange(h) * sh) // h, sh - 1)
        cols = np.minimum((np.arange(w) * sw) // w, sw - 1)
        full = labels[rows[:, None], cols[None, :]]
        return {"labels": full, "sizes": sizes * (w * h) / (sw * sh), "means": means, "adj": adj}

    def _grow(self, sp: dict[str, Any], seed: int, total: float) -> np.ndarray:
        sizes, means, adj = sp["sizes"], sp["means"], sp["adj"]
        min_area, max_area = self.min_area_frac * total, self.max_area_frac * total
        region = {seed}
        area = sizes[seed]
        mean = means[seed].copy()
        heap: list[tuple[float, int]] = []

        def push(n: int) -> None:
            heapq.heappush(heap, (float(np.linalg.norm(means[n] - mean)), n))

        for n in adj[seed]:
            push(n)
        while heap:
            d, n = heapq.heappop(heap)
            if n in region:
                continue
            d_now = float(np.linalg.norm(means[n] - mean))  # the region mean moved since the push
            if d_now > d + 1e-9:
                heapq.heappush(heap, (d_now, n))
                continue
            if (d_now > self.colour_tol and area >= min_area) or area + sizes[n] > max_area:
                break
            region.add(n)
            mean = (mean * area + means[n] * sizes[n]) / (area + sizes[n])
            area += sizes[n]
            for m in adj[n]:
                if m not in region:
                    push(m)
        keep = np.zeros(len(sizes), dtype=bool)
        keep[list(region)] = True
        return keep

    def segment_many(self, image: Image.Image, point_sets: Sequence[Sequence[PointXY]]) -> list[np.ndarray]:
        w, h = image.size
        if not any(point_sets):
            return [np.zeros((h, w), dtype=bool) for _ in point_sets]
        if w < 8 or h < 8:  # too small to segment: the point's region is the image
            return [np.full((h, w), bool(ps), dtype=bool) for ps in point_sets]
        sp = self._superpixels(image)
        labels = sp["labels"]
        out = []
        for points in point_sets:
            keep = np.zeros(len(sp["sizes"]), dtype=bool)
            for p in points:
                x, y = _pixel(p, w, h)
                keep |= self._grow(sp, int(labels[y, x]), float(w * h))
            out.append(keep[labels])
        return out


class SamSegmenter(Segmenter):
    """SamModel or Sam2Model from a local checkpoint directory."""

    name = "sam"

    def __init__(self, path: str, device: str = "auto", multimask: bool = True):
        # torch and transformers only here and in segment_many: the superpixel segmenter, the
        # default of the Serve grounding replicas, needs neither
        from transformers import AutoConfig

        self.device = resolve_device(device)
        self.multimask = bool(multimask)
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type.startswith("sam2"):
            from transformers import Sam2Model as Model
            from transformers import Sam2Processor as Processor
        else:
            from transformers import SamModel as Model
            from transformers import SamProcessor as Processor
        self.sam2 = model_type.startswith("sam2")
        self.model = Model.from_pretrained(path).to(self.device).eval()
        self.processor = Processor.from_pretrained(path)

    def segment_many(self, image: Image.Image, point_sets: Sequence[Sequence[PointXY]]) -> list[np.ndarray]:
        import torch

        w, h = image.size
        flat = [(k, _pixel(p, w, h)) for k, ps in enumerate(point_sets) for p in ps]
        out = [np.zeros((h, w), dtype=bool) for _ in point_sets]
        if not flat:
            return out
        # one image, one prompt (a single positive point) per requested point
        points = [[[[float(x), float(y)]] for _, (x, y) in flat]]
        labels = [[[1] for _ in flat]]
        inputs = self.processor(images=image.convert("RGB"), input_points=points, input_labels=labels,
                                return_tensors="pt")
        with torch.inference_mode():
            pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
            embeddings = self.model.get_image_embeddings(pixel_values)
            result = self.model(image_embeddings=embeddings, input_points=inputs["input_points"].to(self.device),
                                input_labels=inputs["input_labels"].to(self.device),
                                multimask_output=self.multimask)
        kwargs = {}
        if "reshaped_input_sizes" in inputs:
            kwargs["reshaped_input_sizes"] = inputs["reshaped_input_sizes"].cpu()
        masks = self.processor.post_process_masks(result.pred_masks.float().cpu(), inputs["original_sizes"].cpu(),
                                                  **kwargs)[0]  # (points, candidates, H, W)
        iou = result.iou_scores[0].float().cpu()               # (points, candidates)
        for j, (k, _) in enumerate(flat):
            best = int(iou[j].argmax()) if masks.shape[1] > 1 else 0
            out[k] |= masks[j, best].numpy().astype(bool)
        return out


SEGMENTERS: dict[str, type[Segmenter]] = {"superpixel": SuperpixelSegmenter, "sam": SamSegmenter}


def build_segmenter(cfg) -> Segmenter:
    """A segmenter from a :class:`~iqa_spider.infer.config.SegmenterConfig`."""
    if cfg.kind == "superpixel":
        return SuperpixelSegmenter(cfg.n_segments, cfg.colour_tol, cfg.min_area_frac, cfg.max_area_frac)
    if cfg.kind == "sam":
        return SamSegmenter(cfg.path, cfg.device, cfg.multimask)
    raise ValueError(f"unknown segmenter kind {cfg.kind!r}; expected one of {', '.join(SEGMENTERS)}")


__all__ = ["Segmenter", "SuperpixelSegmenter", "SamSegmenter", "SEGMENTERS", "build_segmenter"]
