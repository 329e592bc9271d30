"""Structured configs of the inference engine: the engine, its text-to-point mapping and the segmenter.

Same style as :mod:`iqa_spider.config.schemas`: plain dataclasses loaded by OmegaConf, with
enumerated fields checked in ``__post_init__`` so a typo fails at start naming the key.
Evaluation, batch scoring and serving reuse :class:`InferConfig` and :class:`SegmenterConfig`
next to the shared :class:`~iqa_spider.config.schemas.ModelConfig`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from iqa_spider.config.loader import ConfigValueError, check_at_least, check_choice

# Names of the text-to-point mappings (iqa_spider.infer.text_to_point.MAPPINGS) and of the
# segmenters (iqa_spider.infer.segmenters.SEGMENTERS). Kept here as plain tuples so loading a
# config never imports torch.
MAPPING_NAMES = ("paper", "expected_bin_centre", "bins3x3", "multi_point")
SEGMENTER_KINDS = ("superpixel", "sam")

# The default mapping: the paper's. Another becomes the default only when `make quality`
# measures it better than `paper` on held-out data by more than the seed-to-seed spread
# (bench/results/quality.json, `default_mapping`); on 2026-12-01 none did (BENCHMARKS.md,
# "Quality"). `expected_bin_centre` keeps a confident point off the image border (the paper's
# p(right) = 1 gives x = W), which may pay once a model grounds well: measure it then.
DEFAULT_MAPPING = "paper"

HYD_QUESTION = "Which is the most degraded region in the image?"

# Chat-template markup as the Qwen-VL tokenizers spell it (<|im_end|>, <|image_pad|>,
# <tool_call>, <think>, ...). A question is user text inside the template: markup in it would
# become control tokens (end the user turn, add image slots), so the API refuses it before
# any model work. The engine checks the exact list of its tokenizer (Engine.run).
CONTROL_TOKEN_PATTERN = re.compile(r"<\|[^<>|]{1,64}\|>|</?[A-Za-z_]{1,32}>")


def control_token_in(text: str) -> str | None:
    """The first chat-template markup token in ``text``, or None."""
    found = CONTROL_TOKEN_PATTERN.search(text)
    return found.group(0) if found else None


@dataclass
class SegmenterConfig:
    """Point(s) + image -> mask. `superpixel` needs no weights; `sam` loads SamModel/Sam2Model."""

    kind: str = "superpixel"
    path: str | None = None         # SAM checkpoint directory (kind=sam)
    device: str = "auto"               # auto | cpu | cuda | cuda:N (kind=sam)
    multimask: bool = True             # sam: predict 3 masks per point, keep the best by predicted IoU
    # superpixel: SLIC pieces are grown from the one under the point while their mean colour
    # stays within `colour_tol` (CIELAB distance) of the seed; the mask is kept between these
    # fractions of the image area.
    n_segments: int = 200
    colour_tol: float = 12.0
    min_area_frac: float = 0.01
    max_area_frac: float = 0.5

    def __post_init__(self) -> None:
        check_choice("segmenter.kind", self.kind, SEGMENTER_KINDS)
        if self.kind == "sam" and not self.path:
            raise ConfigValueError("segmenter.path", "kind sam needs a SAM checkpoint directory")
        if not 0.0 < self.min_area_frac <= self.max_area_frac <= 1.0:
            raise ConfigValueError("segmenter.min_area_frac",
                                   "need 0 < min_area_frac <= max_area_frac <= 1")


@dataclass
class InferConfig:
    """How the predictor batches, decodes and turns position words into points."""

    batch_size: int = 8               # images per shared-prefix prefill
    max_rows: int = 32                # (image, question) rows per decoding batch
    max_new_tokens: int = 64          # cap for grounding and referring answers
    describe_max_new_tokens: int = 256  # cap for descriptions
    prefix_sharing: bool = True       # false: one processor call + one generate per (image, question)
    mapping: str = DEFAULT_MAPPING    # text-to-point mapping (see MAPPING_NAMES)
    tau: float = 1.0                  # softmax temperature over the position-word logits
    grid: int = 2                     # position vocabulary the model was trained with: 2 or 3
    # What a result row holds: the Q-Align score always; a global description if `describe`;
    # one grounding answer (point + mask) per question in `ground_questions`.
    describe: bool = True
    ground_questions: list[str] = field(default_factory=lambda: [HYD_QUESTION])
    max_pixels: int = 64_000_000      # inputs with more pixels get error too_many_pixels
    cache_dir: str | None = None   # where MLflow/S3 models are downloaded (null: ~/.cache/iqa-spider/models)

    def __post_init__(self) -> None:
        check_choice("infer.mapping", self.mapping, MAPPING_NAMES)
        check_choice("infer.grid", self.grid, (2, 3))
        check_at_least(1, *((f"infer.{key}", getattr(self, key))
                            for key in ("batch_size", "max_rows", "max_new_tokens", "describe_max_new_tokens")))
        if self.tau <= 0:
            raise ConfigValueError("infer.tau", "must be > 0")


__all__ = ["SegmenterConfig", "InferConfig", "MAPPING_NAMES", "SEGMENTER_KINDS", "DEFAULT_MAPPING", "HYD_QUESTION"]
