"""The known truth of one distorted image, and the one rule that turns it into a quality level.

Everything the writers say is derived from a `Truth`: which regions exist, where they are,
what was applied to each and in which order. The same object becomes the `target` column,
so an answer and its machine-readable truth can never disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from iqa_spider.annotate.distortions import Distortion
from iqa_spider.data import rle
from iqa_spider.vocab import LEVEL_WORDS, cell_words, position_cell

# How much one region at a severity hurts the whole image, before its area is counted.
SEVERITY_WEIGHT = {1: 0.25, 2: 0.45, 3: 0.65, 4: 0.85, 5: 1.0}
# Level bins on the 1..5 score: equal widths, best first (LEVEL_WORDS order).
LEVEL_LOWER_BOUNDS = (4.2, 3.4, 2.6, 1.8, 1.0)


@dataclass
class Region:
    """One region of a distorted image. `mask` is never changed once the region exists: what
    follows from it alone (area, bbox, position, RLE) is computed once per region and kept,
    and a copy (`copy.copy`, how the pipeline reuses one view's regions for every variant)
    keeps it too, since every sample of every variant writes all of it into its target."""

    region_id: str
    mask: np.ndarray  # bool HxW
    label: str | None = None
    distortions: list[Distortion] = field(default_factory=list)  # in the order applied
    grid: int = 2

    @cached_property
    def area_fraction(self) -> float:
        return float(self.mask.mean())

    @cached_property
    def bbox(self) -> list[float]:
        box = rle.bbox_normalized(self.mask)
        return box if box is not None else [0.0, 0.0, 1.0, 1.0]

    @cached_property
    def cell_shares(self) -> np.ndarray:
        """grid x grid: the fraction of the region's area in each cell of the position grid."""
        rows, cols = cell_edges(self.mask.shape[0], self.grid), cell_edges(self.mask.shape[1], self.grid)
        area = np.array([[self.mask[rows[i]:rows[i + 1], cols[j]:cols[j + 1]].sum() for j in range(self.grid)]
                         for i in range(self.grid)], dtype=np.float64)
        return area / max(1.0, area.sum())

    @cached_property
    def cell(self) -> tuple[int, int]:
        """(row, column) of the position-grid cell holding most of the region's area.

        Not simply the bbox centre's cell: a free-form region (a superpixel, an object) often
        has its bbox centre in one cell and most of its pixels in another, and then its words
        point the model, and text-to-point, at the wrong place (bench/results/
        quality_demo_large_regions.json: regions of a cell's size had a median 62% of their
        area in the bbox-centre cell, and a third had under half). Where the bbox centre's cell
        ties with the best, as it does for a grid cell, the whole image or any compact region,
        it is kept, so those regions keep the bbox rule's words.
        """
        shares = self.cell_shares
        centre = position_cell(self.bbox, self.grid)
        if shares[centre] >= shares.max() - 1e-9:
            return centre
        row, col = np.unravel_index(int(np.argmax(shares)), shares.shape)
        return int(row), int(col)

    @cached_property
    def position(self) -> tuple[str, str]:
        """(vertical, horizontal) words of `cell`."""
        return cell_words(*self.cell, self.grid)

    @property
    def position_share(self) -> float:
        """How much of the region its position words cover: 1 for a grid cell, under 0.5 for a
        region spread over several cells, whose words then name only its largest part."""
        return float(self.cell_shares[self.cell])

    @cached_property
    def is_whole_image(self) -> bool:
        return bool(self.mask.all())

    @cached_property
    def mask_rle(self) -> dict:
        return rle.encode(self.mask)

    @property
    def severity(self) -> int:
        """The region's worst severity; a chain counts its worst link plus one step per extra
        link (an accumulated pair is worse than either of its distortions alone), at most 5."""
        if not self.distortions:
            return 0
        return min(5, max(d.severity for d in self.distortions) + len(self.distortions) - 1)

    def damage(self) -> float:
        """0..1: severity weight scaled by sqrt(area), so a small but extreme region still counts."""
        if not self.distortions:
            return 0.0
        return SEVERITY_WEIGHT[self.severity] * math.sqrt(self.area_fraction)


@dataclass
class Truth:
    regions: list[Region]
    width: int
    height: int

    @property
    def distorted(self) -> list[Region]:
        return [r for r in self.regions if r.distortions]

    def quality_score(self) -> float:
        return score_from_damages([r.damage() for r in self.regions])

    def quality_level(self) -> str:
        return level_for_score(self.quality_score())

    def most_degraded(self) -> Region | None:
        return max(self.distorted, key=lambda r: (r.damage(), r.severity), default=None)


def cell_edges(length: int, grid: int) -> list[int]:
    """Pixel boundaries of the position grid along one axis: cell k is [edges[k], edges[k+1]).
    `annotate.regions.grid_regions` cuts its cells at the same edges, so a grid region lies
    wholly in one cell."""
    return [k * length // grid for k in range(grid + 1)]


def score_from_damages(damages: list[float]) -> float:
    """The documented rule (docs/annotation.md): D = 1 - prod(1 - d_r), score = 5 - 4 D.

    Independent regions compound like independent defects: two half-bad regions are worse
    than one, and no sum of regions can push the score below 1.
    """
    survive = 1.0
    for d in damages:
        survive *= 1.0 - min(1.0, max(0.0, d))
    return round(5.0 - 4.0 * (1.0 - survive), 4)


def level_for_score(score: float) -> str:
    for word, lower in zip(LEVEL_WORDS, LEVEL_LOWER_BOUNDS):
        if score >= lower:
            return word
    return LEVEL_WORDS[-1]


def target_struct(truth: Truth, target_ids: list[str], whole_image: bool) -> dict:
    """The `target` column value for one sample about this truth."""
    return {
        "regions": [{
            "region_id": r.region_id,
            "mask_rle": dict(r.mask_rle),
            "bbox": list(r.bbox),
            "position": list(r.position),
            "label": r.label,
            "distortions": [{"type": d.type, "subtype": d.subtype, "severity": d.severity} for d in r.distortions],
        } for r in truth.regions],
        "target_region_ids": list(target_ids),
        "whole_image": whole_image,
        "quality_level": truth.quality_level(),
        "quality_score": truth.quality_score(),
    }
