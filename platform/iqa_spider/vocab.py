"""The IQA vocabulary: the words the model's answers are scored and grounded by.

One place for them, because three parts must agree on the exact strings: the tokenizer
factory (each word must be one token), the annotation writers (answers use these words)
and the inference engine (scoring and text-to-point read the logits of these words).
"""
from __future__ import annotations

# Quality levels, best first, with their Q-Align weights (score = sum p_i * w_i).
LEVEL_WORDS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
LEVEL_WEIGHTS: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)

# Position vocabularies. The paper's is 2x2; 3x3 is an option of the pipeline.
HORIZONTAL_2: tuple[str, ...] = ("left", "right")
VERTICAL_2: tuple[str, ...] = ("top", "bottom")
HORIZONTAL_3: tuple[str, ...] = ("left", "center", "right")
VERTICAL_3: tuple[str, ...] = ("top", "middle", "bottom")
POSITION_WORDS: tuple[str, ...] = tuple(dict.fromkeys(HORIZONTAL_3 + VERTICAL_3))

# The 12 distortion families of DQ-495K (identifiers) and the word an answer uses for each.
# Words are single hyphenated terms so that one token can stand for one family.
DISTORTION_TERMS: dict[str, str] = {
    "blur": "blur",
    "noise": "noise",
    "compression": "compression",
    "brighten": "brightening",
    "darken": "darkening",
    "contrast_strengthen": "contrast-strengthening",
    "contrast_weaken": "contrast-weakening",
    "saturate_strengthen": "saturation-strengthening",
    "saturate_weaken": "saturation-weakening",
    "oversharpen": "oversharpening",
    "pixelate": "pixelation",
    "quantization": "quantization",
}
DISTORTION_FAMILIES: tuple[str, ...] = tuple(DISTORTION_TERMS)

# Severity 1..5 as adjectives (mild .. extreme).
SEVERITY_WORDS: dict[int, str] = {1: "mild", 2: "moderate", 3: "noticeable", 4: "severe", 5: "extreme"}


def single_token_words() -> list[str]:
    """Every word that scoring and text-to-point need as exactly one token."""
    words = list(LEVEL_WORDS) + list(POSITION_WORDS) + list(DISTORTION_TERMS.values())
    return list(dict.fromkeys(words))


# Fixed prompts of the model conventions (docs/architecture.md, "Model conventions").
SCORE_QUESTION = "How would you rate the quality of this image?"
SCORE_ANSWER_PREFIX = "The quality of the image is"


def position_cell(bbox: tuple[float, float, float, float] | list[float], grid: int = 2) -> tuple[int, int]:
    """(row, column) of the grid cell holding the bbox centre.

    grid=2 is the paper's vocabulary: left if cx < 0.5 else right; top if cy < 0.5 else bottom.
    grid=3 splits each axis in thirds: left/center/right x top/middle/bottom.
    """
    if grid not in (2, 3):
        raise ValueError(f"grid must be 2 or 3, got {grid}")
    x0, y0, x1, y1 = bbox
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    return (min(grid - 1, int(cy * grid)), min(grid - 1, int(cx * grid)))


def cell_words(row: int, column: int, grid: int = 2) -> tuple[str, str]:
    """(vertical, horizontal) words of one cell of the 2x2 or 3x3 position grid."""
    if grid == 2:
        return (VERTICAL_2[row], HORIZONTAL_2[column])
    if grid == 3:
        return (VERTICAL_3[row], HORIZONTAL_3[column])
    raise ValueError(f"grid must be 2 or 3, got {grid}")


def position_words(bbox: tuple[float, float, float, float] | list[float], grid: int = 2) -> tuple[str, str]:
    """(vertical, horizontal) words of the bbox centre's cell: the rule for a region known only
    by its box. A region with a mask is named by the cell holding most of its area instead
    (`annotate.truth.Region.position`), which is the same cell for a compact region."""
    return cell_words(*position_cell(bbox, grid), grid)
