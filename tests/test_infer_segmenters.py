"""Segmenters: one interface, the offline superpixel default and SAM (tiny random SamModel)."""
import numpy as np
import pytest
from PIL import Image

from iqa_spider.config import ConfigError, load_config
from iqa_spider.infer.config import EvaluateConfig, SegmenterConfig
from iqa_spider.infer.segmenters import SEGMENTERS, SamSegmenter, Segmenter, SuperpixelSegmenter, build_segmenter


def rectangle_scene(seed=0, h=120, w=160):
    """A noisy, shaded background with a distinct noisy red rectangle."""
    rng = np.random.default_rng(seed)
    img = rng.normal(128, 25, (h, w, 3))
    img[..., 0] += np.linspace(-30, 30, w)[None]
    rect = np.zeros((h, w), bool)
    rect[30:80, 60:130] = True
    img[rect] = rng.normal((200, 40, 40), 15, (int(rect.sum()), 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), rect


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_superpixel_mask_follows_the_region_under_the_point(seed):
    image, rect = rectangle_scene(seed)
    seg = SuperpixelSegmenter()
    mask = seg.segment(image, [(95, 55)])
    assert mask.shape == rect.shape and mask.dtype == bool
    assert iou(mask, rect) > 0.7
    # a point in the background does not take the rectangle
    bg = seg.segment(image, [(10, 10)])
    assert (bg & rect).sum() < 0.05 * rect.sum()
    assert bg.mean() <= 0.5 + 1e-9  # bounded in size


def test_superpixel_segment_many_and_edge_cases():
    image, rect = rectangle_scene()
    seg = SuperpixelSegmenter()
    inside, none, both = seg.segment_many(image, [[(95, 55)], [], [(95, 55), (10, 10)]])
    assert not none.any()
    assert (both | inside).sum() == both.sum() and both.sum() > inside.sum()  # union of the points' masks
    tiny = Image.new("RGB", (1, 1), (10, 20, 30))
    assert seg.segment(tiny, [(0.0, 0.0)]).tolist() == [[True]]
    assert seg.segment(image, [(-5, 1e6)]).shape == rect.shape  # points are clamped into the image


def test_sam_segmenter_with_the_tiny_sam(tiny_sam_dir):
    path = tiny_sam_dir
    seg = build_segmenter(SegmenterConfig(kind="sam", path=str(path), device="cpu"))
    assert isinstance(seg, SamSegmenter) and isinstance(seg, Segmenter)
    image, rect = rectangle_scene()
    masks = seg.segment_many(image, [[(95, 55)], [(10, 10), (150, 100)], []])
    assert [m.shape for m in masks] == [rect.shape] * 3
    assert all(m.dtype == bool for m in masks)
    assert not masks[2].any()
    single = SamSegmenter(str(path), device="cpu", multimask=False).segment(image, [(95, 55)])
    assert single.shape == rect.shape


def test_segmenter_config_is_checked():
    assert set(SEGMENTERS) == {"superpixel", "sam"}
    with pytest.raises(ConfigError, match="segmenter.kind"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "segmenter.kind=grabcut"])
    with pytest.raises(ConfigError, match="segmenter.path"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "segmenter.kind=sam"])
