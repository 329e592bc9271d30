"""Segmenters: one interface, the offline superpixel default and SAM (tiny random SamModel)."""
import numpy as np
import pytest
from PIL import Image

from iqa_spider.config import ConfigError, load_config
from iqa_spider.evaluate.config import EvaluateConfig
from iqa_spider.infer.config import SegmenterConfig
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


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_segmenter_with_the_tiny_sam(tiny_sam_dir, multimask):
    """SAM: one mask per point (the best of its candidates), a set's mask is the union of its
    points' masks, an empty set is an empty mask; batching sets in one call changes nothing."""
    seg = build_segmenter(SegmenterConfig(kind="sam", path=str(tiny_sam_dir), device="cpu", multimask=multimask))
    assert isinstance(seg, SamSegmenter) and isinstance(seg, Segmenter)
    image, rect = rectangle_scene()
    a, b, c = (95, 55), (10, 10), (150, 100)
    masks = seg.segment_many(image, [[a], [b], [c], [b, c], [], [a, b, c]])
    assert [m.shape for m in masks] == [rect.shape] * 6 and all(m.dtype == bool for m in masks)
    ma, mb, mc, mbc, empty, mabc = masks
    for m in (ma, mb, mc):  # each point gets a real mask: not empty, not the whole image
        assert 0 < m.sum() < m.size
    assert not np.array_equal(mb, mc)  # the prompt matters
    assert not empty.any()
    assert np.array_equal(mbc, mb | mc) and np.array_equal(mabc, ma | mb | mc)
    # neither point's mask alone: the set's mask is not just its first or last point's
    assert mbc.sum() > max(mb.sum(), mc.sum())
    # segment() is segment_many() of one set; alone, a point gets the mask it got in the batch
    for points, want in (([a], ma), ([b, c], mbc)):
        got = seg.segment(image, points)
        assert iou(got, want) > 0.99, points
    # points are clamped into the image, as for the superpixel segmenter
    assert np.array_equal(seg.segment(image, [(-5, 1e6)]), seg.segment(image, [(0, rect.shape[0] - 1)]))


def test_segmenter_config_is_checked():
    assert set(SEGMENTERS) == {"superpixel", "sam"}
    with pytest.raises(ConfigError, match="segmenter.kind"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "segmenter.kind=grabcut"])
    with pytest.raises(ConfigError, match="segmenter.path"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "segmenter.kind=sam"])
