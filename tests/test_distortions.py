"""The distortion library of the annotation pipeline (iqa_spider.annotate.distortions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from iqa_spider.annotate import distortions as D
from iqa_spider.annotate.distortions import Distortion
from iqa_spider.vocab import DISTORTION_FAMILIES

SUBTYPE_PAIRS = [(f, s) for f in D.SUBTYPES for s in D.SUBTYPES[f]]


def _photo(name: str, side: int = 256) -> np.ndarray:
    im = Image.fromarray(getattr(data, name)())
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {n: _photo(n) for n in ("astronaut", "chelsea", "coffee")}


@pytest.fixture(scope="module")
def odd_image() -> np.ndarray:
    return np.ascontiguousarray(_photo("astronaut", 160)[:97, :131])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return peak_signal_noise_ratio(a, b, data_range=255) if not np.array_equal(a, b) else math.inf


# ----------------------------------------------------------------------------- vocabulary


def test_families_and_subtypes():
    assert tuple(D.SUBTYPES) == DISTORTION_FAMILIES
    for family, subs in D.SUBTYPES.items():
        assert len(subs) >= 2, family
        assert len(set(subs)) == len(subs)
        for s in subs:
            assert len(D.PARAMS[family][s]) == 5
    assert "jpeg" in D.SUBTYPES["compression"]
    assert {"gaussian", "motion", "lens"} <= set(D.SUBTYPES["blur"])
    assert {"gaussian", "poisson", "impulse", "speckle"} <= set(D.SUBTYPES["noise"])
    assert len(D.all_distortions()) == 5 * len(SUBTYPE_PAIRS)


def test_distortion_validates():
    d = Distortion("blur", "motion", 3)
    assert d.param == D.BLUR["motion"][2] and d.term == "blur" and d.severity_word == "noticeable"
    with pytest.raises(ValueError):
        Distortion("fog", "gaussian", 1)
    with pytest.raises(ValueError):
        Distortion("blur", "zoom", 1)
    for bad in (0, 6, 2.0, True):
        with pytest.raises(ValueError):
            Distortion("blur", "gaussian", bad)
    assert Distortion("noise", "impulse", np.int64(2)).severity == 2


def test_apply_rejects_bad_images():
    d = Distortion("blur", "gaussian", 1)
    with pytest.raises(ValueError):
        D.apply(np.zeros((8, 8), np.uint8), d, 0)
    with pytest.raises(ValueError):
        D.apply(np.zeros((8, 8, 4), np.uint8), d, 0)
    with pytest.raises(ValueError):
        D.apply(np.zeros((8, 8, 3), np.float32), d, 0)
    with pytest.raises(ValueError):
        D.apply(np.zeros((0, 8, 3), np.uint8), d, 0)


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize("shape", [(97, 131), (8, 8), (1, 1), (3, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_every_distortion_applies(shape, odd_image):
    if shape == (97, 131):
        img = odd_image
    else:
        img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    for d in D.all_distortions():
        out = D.apply(img, d, seed=7)
        assert out.dtype == np.uint8 and out.shape == img.shape, d
    assert not np.shares_memory(D.apply(img, Distortion("brighten", "gamma", 1), 0), img)


def test_input_is_not_modified(odd_image):
    before = odd_image.copy()
    for d in D.all_distortions()[::3]:
        D.apply(odd_image, d, 1)
    assert np.array_equal(odd_image, before)


@pytest.mark.parametrize("family,subtype", SUBTYPE_PAIRS, ids=[f"{f}-{s}" for f, s in SUBTYPE_PAIRS])
def test_severity_is_monotone(family, subtype, photos):
    """PSNR to the pristine image strictly decreases from severity 1 to 5 (SSIM as the
    fallback metric), and severity 5 changes the image clearly more than severity 1."""
    for name, img in photos.items():
        outs = [D.apply(img, Distortion(family, subtype, k), seed=11) for k in D.SEVERITIES]
        psnr = [_psnr(img, o) for o in outs]
        if not all(a > b for a, b in zip(psnr, psnr[1:])):
            ssim = [structural_similarity(img, o, channel_axis=2, data_range=255) for o in outs]
            assert all(a > b for a, b in zip(ssim, ssim[1:])), (name, psnr, ssim)
        assert math.isfinite(psnr[0]), f"severity 1 leaves {name} unchanged"
        assert psnr[0] - psnr[4] >= 4.0, (name, psnr)
        mad = [np.abs(o.astype(np.int16) - img).mean() for o in outs]
        assert mad[4] >= 2.0 * mad[0], (name, mad)


def test_deterministic_for_a_seed():
    img = _photo("coffee", 64)
    for d in D.all_distortions():
        assert np.array_equal(D.apply(img, d, 5), D.apply(img, d, 5)), d
    for sub in D.SUBTYPES["noise"]:
        d = Distortion("noise", sub, 3)
        assert not np.array_equal(D.apply(img, d, 5), D.apply(img, d, 6)), d
    # the motion-blur direction comes from the seed too
    d = Distortion("blur", "motion", 4)
    assert not np.array_equal(D.apply(img, d, 5), D.apply(img, d, 6))
    # huge and negative seeds are accepted
    D.apply(img, Distortion("noise", "gaussian", 1), -3)
    D.apply(img, Distortion("noise", "gaussian", 1), 2**70)


def test_spatial_parameters_scale_with_large_images():
    img = np.random.default_rng(0).integers(0, 256, (1024, 1100, 3), dtype=np.uint8)
    out = D.apply(img, Distortion("pixelate", "block", 1), 0)  # 2 px at 512 -> 4 px here
    assert (out[:4, :4] == img[1, 1]).all() and (out[4:8, 4:8] == img[5, 5]).all()
    small = img[:300, :300]
    out = D.apply(small, Distortion("pixelate", "block", 1), 0)  # below 512: the reference 2 px
    assert (out[:2, :2] == small[0, 0]).all() and (out[2:4, 2:4] == small[2, 2]).all()


# ----------------------------------------------------------------------------- regions


def _blob_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    m = ((yy - 0.45 * h) / (0.25 * h)) ** 2 + ((xx - 0.55 * w) / (0.2 * w)) ** 2 <= 1
    m[int(0.7 * h):int(0.9 * h), int(0.05 * w):int(0.3 * w)] = True
    return m


@pytest.mark.parametrize("feather", [3.0, 1.5, 0.0])
@pytest.mark.parametrize("chain", [
    [Distortion("blur", "lens", 4)],
    [Distortion("noise", "gaussian", 2)],
    [Distortion("contrast_weaken", "linear", 3), Distortion("pixelate", "mosaic", 3)],
    [Distortion("compression", "jpeg", 4), Distortion("noise", "impulse", 2)],
], ids=["blur", "noise", "cw+pix", "jpeg+impulse"])
def test_apply_in_region_only_changes_the_region(chain, feather, photos):
    img = photos["chelsea"]
    h, w = img.shape[:2]
    mask = _blob_mask(h, w)
    out = D.apply_in_region(img, mask, chain, seed=3, feather_px=feather)
    assert out.dtype == np.uint8 and out.shape == img.shape
    r = math.ceil(3 * feather)
    grown = ndimage.binary_dilation(mask, np.ones((2 * r + 1, 2 * r + 1), bool)) if r else mask
    assert np.array_equal(out[~grown], img[~grown])
    diff = np.abs(out.astype(np.int16) - img).mean(axis=2)
    inside, outside = diff[mask].mean(), diff[~mask].mean()
    assert inside > 3.0 and inside > 10 * outside, (inside, outside)
    # deterministic
    assert np.array_equal(out, D.apply_in_region(img, mask, chain, seed=3, feather_px=feather))


def test_apply_in_region_full_and_empty_masks(odd_image):
    chain = [Distortion("blur", "gaussian", 3), Distortion("noise", "poisson", 2)]
    full = np.ones(odd_image.shape[:2], bool)
    out = D.apply_in_region(odd_image, full, chain, seed=9)
    assert np.array_equal(out, D.apply_chain(odd_image, chain, 9))
    empty = np.zeros_like(full)
    assert np.array_equal(D.apply_in_region(odd_image, empty, chain, seed=9), odd_image)
    assert np.array_equal(D.apply_in_region(odd_image, full, [], seed=9), odd_image)
    # a one-step chain uses the seed itself: the same as apply
    one = [Distortion("noise", "gaussian", 3)]
    assert np.array_equal(D.apply_in_region(odd_image, full, one, 4), D.apply(odd_image, one[0], 4))
    with pytest.raises(ValueError):
        D.apply_in_region(odd_image, full[:-1], chain, seed=9)


def test_apply_in_region_tiny_image():
    img = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:6] = True
    for chain in ([Distortion("blur", "motion", 5)],
                  [Distortion("compression", "jpeg2000", 3), Distortion("noise", "speckle", 5)]):
        out = D.apply_in_region(img, mask, chain, seed=1, feather_px=1.0)
        assert out.shape == img.shape and out.dtype == np.uint8


def test_region_alpha_support():
    mask = np.zeros((64, 64), bool)
    mask[20:40, 25:30] = True
    a = D.region_alpha(mask, 3.0)
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() <= 1.0
    grown = ndimage.binary_dilation(mask, np.ones((19, 19), bool))
    assert (a[~grown] == 0).all()
    assert (a[mask] > 0.3).all()
    assert (D.region_alpha(np.ones((10, 10), bool), 3.0) == 1.0).all()
    assert np.array_equal(D.region_alpha(mask, 0.0), mask.astype(np.float32))


# ----------------------------------------------------------------------------- accumulation


def test_accumulation_orders_match_architecture():
    assert {k: set(v) for k, v in D.ACCUMULATION_ORDERS.items()} == {
        "blur": {"compression", "noise"},
        "compression": {"blur", "noise"},
        "contrast_weaken": {"noise", "blur", "compression", "contrast_weaken", "pixelate", "saturate_weaken"},
        "pixelate": {"noise"},
        "saturate_weaken": {"noise"},
    }
    assert D.is_valid_order("blur", "noise")
    assert D.is_valid_order("contrast_weaken", "contrast_weaken")
    assert not D.is_valid_order("noise", "blur")
    assert not D.is_valid_order("blur", "blur")
    assert not D.is_valid_order("pixelate", "compression")
    assert not D.is_valid_order("unknown", "noise")


def test_sample_dao_chain_is_valid():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        chain = D.sample_dao_chain(rng)
        assert len(chain) == 2 and all(isinstance(d, Distortion) for d in chain)
        assert D.is_valid_order(chain[0].type, chain[1].type), chain
        seen.add((chain[0].type, chain[1].type))
    expected = {(a, b) for a, bs in D.ACCUMULATION_ORDERS.items() for b in bs}
    assert seen == expected
    a = D.sample_dao_chain(np.random.default_rng(42))
    assert a == D.sample_dao_chain(np.random.default_rng(42))


def test_sample_distortion():
    rng = np.random.default_rng(1)
    ds = [D.sample_distortion(rng) for _ in range(2000)]
    assert {d.type for d in ds} == set(DISTORTION_FAMILIES)
    assert {d.severity for d in ds} == set(D.SEVERITIES)
    assert {(d.type, d.subtype) for d in ds} == set(SUBTYPE_PAIRS)
    d = D.sample_distortion(rng, family="noise", severity=4)
    assert d.type == "noise" and d.severity == 4 and d.subtype in D.SUBTYPES["noise"]
    with pytest.raises(ValueError):
        D.sample_distortion(rng, family="fog")
    with pytest.raises(ValueError):
        D.sample_distortion(rng, family="blur", severity=9)


def test_min_severity_keeps_the_stream_and_narrows_the_range():
    """min_severity=1 draws exactly what the sampler drew before the option (the same
    datasets); above 1 it draws only the stronger severities, in both steps of a DAO chain."""
    plain = [D.sample_distortion(np.random.default_rng(5)) for _ in range(50)]
    ones = [D.sample_distortion(np.random.default_rng(5), min_severity=1) for _ in range(50)]
    assert plain == ones
    rng = np.random.default_rng(2)
    strong = [D.sample_distortion(rng, min_severity=4) for _ in range(500)]
    assert {d.severity for d in strong} == {4, 5}
    chains = [D.sample_dao_chain(rng, min_severity=5) for _ in range(100)]
    assert {d.severity for c in chains for d in c} == {5}


def test_a_family_subset_keeps_the_stream_and_the_paper_orders_within_it():
    """families left at all of them draws what the sampler drew before the option; a subset
    draws only its families, and DAO chains only the paper's orders with both steps in it."""
    from iqa_spider.vocab import DISTORTION_FAMILIES

    before, after = np.random.default_rng(5), np.random.default_rng(5)
    plain = [D.sample_distortion(before) for _ in range(50)]
    assert plain == [D.sample_distortion(after, families=DISTORTION_FAMILIES) for _ in range(50)]
    assert ([D.sample_dao_chain(before) for _ in range(50)]
            == [D.sample_dao_chain(after, families=DISTORTION_FAMILIES) for _ in range(50)])
    assert D.accumulation_orders() == D.ACCUMULATION_ORDERS
    rng = np.random.default_rng(3)
    four = ("blur", "noise", "compression", "brighten")
    assert {D.sample_distortion(rng, families=four).type for _ in range(400)} == set(four)
    orders = D.accumulation_orders(four)
    assert orders and all(f in four and set(s) <= set(four) for f, s in orders.items())
    chains = [D.sample_dao_chain(rng, families=four) for _ in range(200)]
    assert all(c[1].type in orders[c[0].type] for c in chains)
    assert D.accumulation_orders(("blur",)) == {}
    with pytest.raises(ValueError, match="accumulation order"):
        D.sample_dao_chain(rng, families=("blur",))
