"""The distortion library of the automatic annotation pipeline (DQ-495K style).

Region-level synthetic distortions on pristine images: the 12 families of
`vocab.DISTORTION_FAMILIES`, each with sub-types and five severities (1 = mild, just
visible .. 5 = extreme, `vocab.SEVERITY_WORDS`), applied to a whole image (`apply`) or, as an
accumulated chain, composited into a region (`apply_in_region`) with a feathered edge.
Accumulation orders for DAO-G follow the paper (docs/annotation.md, "Distortions").

Conventions
- Images are HxWx3 uint8 RGB in and out. Every step of a chain returns uint8, as a stored
  image would be between two processes.
- Deterministic for a seed: all randomness (noise, the motion-blur angle) comes from
  `np.random.default_rng(seed)`; step i > 0 of a chain uses a seed derived from (seed, i).
- Spatial parameters (blur sigma / length / radius, unsharp radius, pixel block size) are
  given in pixels for a reference short side of `REFERENCE_SIDE` (512) px. Larger images scale
  them up by short_side / 512, so that a severity looks the same once the image is viewed at a
  common size; smaller images keep the reference values (never below them, so that severity 1
  stays visible on small crops). Per-pixel parameters (noise, tone, colour, codec quality) do
  not scale.
- Severity is monotone in damage: for every sub-type the PSNR to the pristine image strictly
  decreases from severity 1 to 5 on natural photos (tests/test_distortions.py checks it).
- Speed: vectorised numpy / scipy (FFT convolution, LUTs for tone curves on uint8), no loops
  over pixels. At 512x512 on one CPU core: tone / contrast / quantization / pixelate / jpeg
  2-10 ms, noise 3-25 ms (Poisson at severity 4-5 ~50 ms), blur and CIELAB 15-32 ms,
  jpeg2000 ~90 ms (the OpenJPEG encoder itself).
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage, signal

from iqa_spider.vocab import DISTORTION_FAMILIES, DISTORTION_TERMS, SEVERITY_WORDS

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 512

# ---------------------------------------------------------------------------------------------
# Severity tables: family -> sub-type -> five parameters for severities 1..5.
# Values were chosen so that 1 is just visible at 512 px and 5 is extreme, with roughly
# geometric steps between (perceived damage grows with the log of most parameters).
# ---------------------------------------------------------------------------------------------

BLUR: dict[str, tuple] = {
    # Gaussian sigma in px. 0.8 px softens edges just visibly; 5 px wipes out all texture.
    "gaussian": (0.8, 1.4, 2.2, 3.4, 5.0),
    # Length in px of a straight line kernel (camera shake) at a random angle from the seed.
    # A line of length L has std L/sqrt(12) along it: 4 px ~ sigma 1.2 in one direction.
    "motion": (4, 7, 12, 19, 28),
    # Radius in px of an anti-aliased disk (defocus / lens blur). A disk of radius r has std
    # ~r/2, so the rows match the gaussian rows in spread.
    "lens": (1.5, 2.5, 4.0, 6.0, 9.0),
}

NOISE: dict[str, tuple] = {
    # Std of additive white noise, per channel, in 8-bit levels. 5 is visible in flat areas.
    "gaussian": (5.0, 10.0, 17.0, 27.0, 40.0),
    # Shot noise: photons collected at full white. Fewer photons = more noise; the std at
    # mid grey is 255*sqrt(0.5/peak): 9, 15, 23, 36, 57 levels.
    "poisson": (400.0, 150.0, 60.0, 25.0, 10.0),
    # Salt & pepper: fraction of pixels set to white or black (half each).
    "impulse": (0.01, 0.03, 0.07, 0.13, 0.22),
    # Multiplicative noise x * (1 + n), n ~ N(0, std): std of n.
    "speckle": (0.06, 0.12, 0.20, 0.30, 0.45),
}

COMPRESSION: dict[str, tuple] = {
    # libjpeg quality (Pillow, default 4:2:0 chroma subsampling). 40 shows ringing on edges
    # just visibly; 3 is all 8x8 blocks.
    "jpeg": (40, 25, 15, 8, 3),
    # JPEG 2000 (OpenJPEG in Pillow, irreversible 9/7 wavelet) compression ratio vs 24 bpp:
    # 1.0, 0.5, 0.25, 0.125, 0.06 bits per pixel; blur and wavelet ringing grow with it.
    "jpeg2000": (24, 48, 96, 192, 400),
}

BRIGHTEN: dict[str, tuple] = {
    # Gamma < 1 on [0, 1] (lifts mid-tones): mid grey goes to 0.57, 0.63, 0.70, 0.76, 0.81.
    "gamma": (0.80, 0.66, 0.52, 0.40, 0.30),
    # Exposure gain (x * k, clipped): highlights burn out from severity 3 on.
    "linear": (1.15, 1.30, 1.50, 1.80, 2.20),
}

DARKEN: dict[str, tuple] = {
    # Gamma > 1 (sinks mid-tones): mid grey goes to 0.42, 0.34, 0.26, 0.18, 0.10.
    "gamma": (1.25, 1.55, 1.95, 2.50, 3.30),
    # Exposure gain < 1: mid grey goes to 0.43, 0.35, 0.28, 0.20, 0.14.
    "linear": (0.85, 0.70, 0.55, 0.40, 0.27),
}

CONTRAST_STRENGTHEN: dict[str, tuple] = {
    # Linear stretch around the image mean: mean + c * (x - mean), clipped.
    "linear": (1.20, 1.45, 1.75, 2.15, 2.70),
    # S-curve: a logistic of gain g centred at 0.5, renormalised to map 0 -> 0 and 1 -> 1.
    # Slope at mid grey is 1.3, 1.6, 2.1, 3.0, 4.3 (g -> 0 would be the identity).
    "sigmoid": (4.0, 6.0, 8.5, 12.0, 17.0),
}

CONTRAST_WEAKEN: dict[str, tuple] = {
    # Linear compression towards the image mean: mean + c * (x - mean) (washed out, hazy).
    "linear": (0.80, 0.62, 0.46, 0.32, 0.20),
    # Inverse S-curve (the inverse of the strengthen curve with the same gain): mid-tone
    # contrast is divided by 1.3 .. 4.3, a flat, faded look.
    "sigmoid": (4.0, 6.0, 8.5, 12.0, 17.0),
}

SATURATE_STRENGTHEN: dict[str, tuple] = {
    # Factor on HSV saturation, hue and value kept exactly (per pixel clamped at S = 1).
    # Already vivid pixels saturate early, so the steps widen towards 5.
    "hsv": (1.20, 1.45, 1.85, 2.50, 3.50),
    # Factor on CIELAB chroma (a*, b*), L* kept; out-of-gamut colours are clipped.
    "lab": (1.20, 1.45, 1.85, 2.50, 3.50),
}

SATURATE_WEAKEN: dict[str, tuple] = {
    # Factor on HSV saturation (0 = grey). 0.08 leaves a barely tinted grey image.
    "hsv": (0.75, 0.55, 0.38, 0.22, 0.08),
    # Factor on CIELAB chroma, L* kept.
    "lab": (0.75, 0.55, 0.38, 0.22, 0.08),
}

OVERSHARPEN: dict[str, tuple] = {
    # Unsharp mask x + amount * (x - gaussian(x, sigma)): (amount, sigma px). Halos widen and
    # brighten with severity.
    "unsharp": ((0.8, 1.0), (1.5, 1.2), (2.5, 1.5), (4.0, 1.8), (6.0, 2.2)),
    # High-boost with the 4-neighbour Laplacian x - a * lap(x): pixel-scale crunchy edges
    # and amplified fine noise.
    "laplacian": (0.3, 0.6, 1.0, 1.6, 2.5),
}

PIXELATE: dict[str, tuple] = {
    # Block size in px; each block takes its centre pixel (nearest-neighbour down/up-scale).
    "block": (2, 3, 5, 8, 12),
    # Block size in px; each block takes its mean colour (box average, mosaic).
    "mosaic": (2, 3, 5, 8, 12),
}

QUANTIZATION: dict[str, tuple] = {
    # Levels per channel (uniform, 255 / (L - 1) apart): banding in smooth gradients.
    "uniform": (24, 12, 8, 5, 3),
    # Colours of an adaptive palette (Pillow median cut, no dithering): posterisation.
    "palette": (64, 32, 16, 8, 4),
}

PARAMS: dict[str, dict[str, tuple]] = {
    "blur": BLUR,
    "noise": NOISE,
    "compression": COMPRESSION,
    "brighten": BRIGHTEN,
    "darken": DARKEN,
    "contrast_strengthen": CONTRAST_STRENGTHEN,
    "contrast_weaken": CONTRAST_WEAKEN,
    "saturate_strengthen": SATURATE_STRENGTHEN,
    "saturate_weaken": SATURATE_WEAKEN,
    "oversharpen": OVERSHARPEN,
    "pixelate": PIXELATE,
    "quantization": QUANTIZATION,
}
assert tuple(PARAMS) == DISTORTION_FAMILIES, "PARAMS must list the families of vocab"
assert all(len(v) == len(SEVERITIES) for t in PARAMS.values() for v in t.values())

SUBTYPES: dict[str, tuple[str, ...]] = {family: tuple(table) for family, table in PARAMS.items()}

# DAO-G accumulation orders of the paper (docs/annotation.md, "Distortions"): first family -> second families.
ACCUMULATION_ORDERS: dict[str, tuple[str, ...]] = {
    "blur": ("compression", "noise"),
    "compression": ("blur", "noise"),
    "contrast_weaken": ("noise", "blur", "compression", "contrast_weaken", "pixelate", "saturate_weaken"),
    "pixelate": ("noise",),
    "saturate_weaken": ("noise",),
}


@dataclass(frozen=True)
class Distortion:
    type: str      # one of vocab.DISTORTION_FAMILIES
    subtype: str   # one of SUBTYPES[type]
    severity: int  # 1..5 (mild .. extreme)

    def __post_init__(self) -> None:
        if self.type not in PARAMS:
            raise ValueError(f"unknown distortion family {self.type!r}; expected one of {DISTORTION_FAMILIES}")
        if self.subtype not in PARAMS[self.type]:
            raise ValueError(f"unknown sub-type {self.subtype!r} of {self.type}; expected one of {SUBTYPES[self.type]}")
        if isinstance(self.severity, bool) or not isinstance(self.severity, (int, np.integer)) or not 1 <= self.severity <= 5:
            raise ValueError(f"severity must be an int in 1..5, got {self.severity!r}")
        object.__setattr__(self, "severity", int(self.severity))

    @property
    def param(self):
        """The severity table entry for this distortion (at the reference size)."""
        return PARAMS[self.type][self.subtype][self.severity - 1]

    @property
    def term(self) -> str:
        """The answer word for the family (vocab.DISTORTION_TERMS)."""
        return DISTORTION_TERMS[self.type]

    @property
    def severity_word(self) -> str:
        return SEVERITY_WORDS[self.severity]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def _seed(seed: int) -> int:
    return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def _step_seed(seed: int, step: int) -> int:
    """Seed of chain step `step`: step 0 uses the seed itself (a one-step chain equals apply)."""
    if step == 0:
        return _seed(seed)
    return int(np.random.SeedSequence([_seed(seed), step]).generate_state(1, np.uint64)[0])


def _spatial_scale(shape: tuple[int, ...]) -> float:
    return max(1.0, min(shape[0], shape[1]) / REFERENCE_SIDE)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    x = np.rint(x, out=x) if x.dtype.kind == "f" else x
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def _lut(image: np.ndarray, curve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a tone curve on [0, 1] to a uint8 image through a 256-entry look-up table."""
    u = np.arange(256, dtype=np.float64) / 255.0
    table = np.clip(np.rint(curve(u) * 255.0), 0, 255).astype(np.uint8)
    return table[image]


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel of a float32 HxWx3 image with a 2-D kernel, mirrored borders."""
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)), mode="symmetric")
    return signal.fftconvolve(xp, kernel.astype(np.float32)[:, :, None], mode="valid", axes=(0, 1))


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    """Anti-aliased straight line of `length` px through the centre, normalised to sum 1."""
    length = max(float(length), 1.0)
    half = (length - 1.0) / 2.0
    r = int(math.ceil(half)) + 1
    size = 2 * r + 1
    t = np.linspace(-half, half, int(math.ceil(length * 4)) + 1)
    a = math.radians(angle_deg)
    xs = r + t * math.cos(a)
    ys = r - t * math.sin(a)
    x0 = np.floor(xs).astype(int)
    y0 = np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    k = np.zeros((size, size), np.float64)
    np.add.at(k, (y0, x0), (1 - fx) * (1 - fy))
    np.add.at(k, (y0, x0 + 1), fx * (1 - fy))
    np.add.at(k, (y0 + 1, x0), (1 - fx) * fy)
    np.add.at(k, (y0 + 1, x0 + 1), fx * fy)
    return k / k.sum()


def _disk_kernel(radius: float) -> np.ndarray:
    """Anti-aliased disk of `radius` px, normalised to sum 1."""
    r = int(math.ceil(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.clip(radius + 0.5 - np.hypot(yy, xx), 0.0, 1.0)
    return k / k.sum()


# sRGB <-> linear <-> XYZ (D65) for the CIELAB chroma scaling.
_U8 = np.arange(256) / 255.0
_SRGB_TO_LINEAR = np.where(_U8 <= 0.04045, _U8 / 12.92, ((_U8 + 0.055) / 1.055) ** 2.4).astype(np.float32)
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
# XYZ/white from linear RGB, and back: folded into two 3x3 matrices.
_LIN_TO_XYZN = (_RGB_TO_XYZ / _WHITE[:, None]).astype(np.float32)
_XYZN_TO_LIN = np.linalg.inv(_RGB_TO_XYZ / _WHITE[:, None]).astype(np.float32)
_LAB_EPS = (6.0 / 29.0) ** 3
_LAB_DELTA = 6.0 / 29.0


def _lab_f(t: np.ndarray) -> np.ndarray:
    return np.where(t > _LAB_EPS, np.cbrt(t), t / (3 * _LAB_DELTA ** 2) + 4.0 / 29.0)


def _lab_f_inv(f: np.ndarray) -> np.ndarray:
    return np.where(f > _LAB_DELTA, f * f * f, 3 * _LAB_DELTA ** 2 * (f - 4.0 / 29.0))


def _linear_to_srgb_u8(lin: np.ndarray) -> np.ndarray:
    lin = np.clip(lin, 0.0, 1.0, out=lin)
    srgb = np.where(lin <= 0.0031308, lin * 12.92, 1.055 * np.power(lin, 1 / 2.4, dtype=np.float32) - 0.055)
    return _to_uint8((srgb * 255.0).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Families. Each takes (uint8 image, subtype, table parameter, rng, spatial scale) -> uint8.
# ---------------------------------------------------------------------------------------------

def _blur(img, subtype, p, rng, scale):
    x = img.astype(np.float32)
    if subtype == "gaussian":
        s = p * scale
        return _to_uint8(ndimage.gaussian_filter(x, sigma=(s, s, 0), mode="reflect"))
    if subtype == "motion":
        angle = float(rng.uniform(0.0, 180.0))
        return _to_uint8(_convolve(x, _line_kernel(p * scale, angle)))
    if subtype == "lens":
        return _to_uint8(_convolve(x, _disk_kernel(p * scale)))
    raise AssertionError(subtype)


def _noise(img, subtype, p, rng, scale):
    if subtype == "gaussian":
        x = img.astype(np.float32)
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(p)
        return _to_uint8(x)
    if subtype == "poisson":
        # lam = photons per pixel. Exact Poisson draws where lam is small (dark pixels), its
        # normal approximation N(lam, lam) elsewhere (indistinguishable there, 5x faster).
        lam = img.astype(np.float32) * np.float32(p / 255.0)
        counts = lam + np.sqrt(lam) * rng.standard_normal(lam.shape, dtype=np.float32)
        small = lam < 16.0
        if small.any():
            counts[small] = rng.poisson(lam[small])
        return _to_uint8(counts * np.float32(255.0 / p))
    if subtype == "impulse":
        u = rng.random(img.shape[:2], dtype=np.float32)
        out = img.copy()
        out[u < p / 2] = 255
        out[(u >= p / 2) & (u < p)] = 0
        return out
    if subtype == "speckle":
        x = img.astype(np.float32)
        x *= 1.0 + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(p)
        return _to_uint8(x)
    raise AssertionError(subtype)


def _compression(img, subtype, p, rng, scale):
    buf = io.BytesIO()
    pil = Image.fromarray(img)
    if subtype == "jpeg":
        pil.save(buf, format="JPEG", quality=int(p))
    elif subtype == "jpeg2000":
        levels = max(1, min(6, int(math.log2(min(img.shape[:2]))) + 1))
        pil.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[float(p)],
                 irreversible=True, num_resolutions=levels)
    else:
        raise AssertionError(subtype)
    with Image.open(io.BytesIO(buf.getvalue())) as dec:
        return np.asarray(dec.convert("RGB"), dtype=np.uint8).copy()


def _brighten(img, subtype, p, rng, scale):
    if subtype == "gamma":
        return _lut(img, lambda u: u ** p)
    if subtype == "linear":
        return _lut(img, lambda u: u * p)
    raise AssertionError(subtype)


_darken = _brighten  # same curves, the table picks the direction


def _sigmoid_curve(gain: float, inverse: bool) -> Callable[[np.ndarray], np.ndarray]:
    s0 = 1.0 / (1.0 + math.exp(gain / 2))
    s1 = 1.0 / (1.0 + math.exp(-gain / 2))

    def forward(u):
        return (1.0 / (1.0 + np.exp(-gain * (u - 0.5))) - s0) / (s1 - s0)

    def backward(u):
        v = np.clip(u * (s1 - s0) + s0, 1e-12, 1 - 1e-12)
        return 0.5 + np.log(v / (1.0 - v)) / gain

    return backward if inverse else forward


def _contrast(img, subtype, p, rng, scale, inverse=False):
    if subtype == "linear":
        mean = float(img.mean()) / 255.0
        return _lut(img, lambda u: mean + p * (u - mean))
    if subtype == "sigmoid":
        return _lut(img, _sigmoid_curve(p, inverse))
    raise AssertionError(subtype)


def _contrast_strengthen(img, subtype, p, rng, scale):
    return _contrast(img, subtype, p, rng, scale, inverse=False)


def _contrast_weaken(img, subtype, p, rng, scale):
    return _contrast(img, subtype, p, rng, scale, inverse=True)


def _saturate(img, subtype, p, rng, scale):
    if subtype == "hsv":
        # In HSV, V = max, S = (max - min) / max and the hue depends only on the ratios of
        # (c - min) / (max - min). c' = V - k (V - c) keeps V and hue and scales S by k; k is
        # clamped per pixel at V / (V - min) so that S' <= 1 (min' >= 0) and the hue stays.
        r, g, b = img[..., 0], img[..., 1], img[..., 2]
        v = np.maximum(np.maximum(r, g), b).astype(np.float32)[..., None]
        mn = np.minimum(np.minimum(r, g), b).astype(np.float32)[..., None]
        x = img.astype(np.float32)
        k = np.float32(p)
        if p > 1:
            span = v - mn
            k = np.minimum(k, np.divide(v, span, out=np.full_like(v, k), where=span > 0))
        return _to_uint8(v - k * (v - x))
    if subtype == "lab":
        # Scaling a* and b* by k with L* kept is, in terms of f(X/Xn), f(Y/Yn), f(Z/Zn):
        # fy kept, fx' = fy + k (fx - fy), fz' = fy + k (fz - fy).
        lin = _SRGB_TO_LINEAR[img]
        xyz = lin @ _LIN_TO_XYZN.T
        f = _lab_f(np.maximum(xyz, 0))
        fy = f[..., 1:2]
        f = fy + np.float32(p) * (f - fy)
        xyz = _lab_f_inv(f).astype(np.float32)
        return _linear_to_srgb_u8(xyz @ _XYZN_TO_LIN.T)
    raise AssertionError(subtype)


def _oversharpen(img, subtype, p, rng, scale):
    x = img.astype(np.float32)
    if subtype == "unsharp":
        amount, sigma = p
        s = sigma * scale
        blurred = ndimage.gaussian_filter(x, sigma=(s, s, 0), mode="reflect")
        return _to_uint8(x + np.float32(amount) * (x - blurred))
    if subtype == "laplacian":
        xp = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        lap = xp[:-2, 1:-1] + xp[2:, 1:-1] + xp[1:-1, :-2] + xp[1:-1, 2:] - 4.0 * x
        return _to_uint8(x - np.float32(p) * lap)
    raise AssertionError(subtype)


def _block_starts(n: int, b: int) -> np.ndarray:
    return np.arange(0, n, b)


def _pixelate(img, subtype, p, rng, scale):
    b = max(1, int(round(p * scale)))
    h, w = img.shape[:2]
    if subtype == "block":
        def centres(n):
            starts = (np.arange(n) // b) * b
            ends = np.minimum(starts + b, n)
            return (starts + ends - 1) // 2
        return img[centres(h)][:, centres(w)]
    if subtype == "mosaic":
        rs, cs = _block_starts(h, b), _block_starts(w, b)
        sums = np.add.reduceat(np.add.reduceat(img.astype(np.float32), rs, axis=0), cs, axis=1)
        counts = np.outer(np.diff(np.append(rs, h)), np.diff(np.append(cs, w))).astype(np.float32)
        means = _to_uint8(sums / counts[:, :, None])
        return np.repeat(np.repeat(means, b, axis=0)[:h], b, axis=1)[:, :w]
    raise AssertionError(subtype)


_PALETTE_SIDE = 128


def _quantization(img, subtype, p, rng, scale):
    if subtype == "uniform":
        levels = int(p) - 1
        return _lut(img, lambda u: np.rint(u * levels) / levels)
    if subtype == "palette":
        # Median cut is O(pixels) but slow in Pillow (~170 ms at 512 px): build the palette on
        # a copy of at most _PALETTE_SIDE px a side (~15 ms), then map every pixel to it.
        pil = Image.fromarray(img)
        sample = pil
        if max(pil.size) > _PALETTE_SIDE:
            sample = pil.copy()
            sample.thumbnail((_PALETTE_SIDE, _PALETTE_SIDE), Image.Resampling.BOX)
        palette = sample.quantize(colors=int(p), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        mapped = pil.quantize(palette=palette, dither=Image.Dither.NONE)
        return np.asarray(mapped.convert("RGB"), dtype=np.uint8).copy()
    raise AssertionError(subtype)


_FAMILY_FUNCS: dict[str, Callable] = {
    "blur": _blur,
    "noise": _noise,
    "compression": _compression,
    "brighten": _brighten,
    "darken": _darken,
    "contrast_strengthen": _contrast_strengthen,
    "contrast_weaken": _contrast_weaken,
    "saturate_strengthen": _saturate,
    "saturate_weaken": _saturate,
    "oversharpen": _oversharpen,
    "pixelate": _pixelate,
    "quantization": _quantization,
}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def apply(image: np.ndarray, d: Distortion, seed: int) -> np.ndarray:
    """Distort the whole image: HxWx3 uint8 RGB -> HxWx3 uint8, deterministic for the seed."""
    img = _check_image(image)
    if not isinstance(d, Distortion):
        raise TypeError(f"expected a Distortion, got {type(d).__name__}")
    rng = np.random.default_rng(_seed(seed))
    out = _FAMILY_FUNCS[d.type](img, d.subtype, d.param, rng, _spatial_scale(img.shape))
    assert out.shape == img.shape and out.dtype == np.uint8, (d, out.shape, out.dtype)
    return out


def apply_chain(image: np.ndarray, chain: Sequence[Distortion], seed: int) -> np.ndarray:
    """Apply the distortions in order (accumulation) to the whole image."""
    out = _check_image(image)
    for i, d in enumerate(chain):
        out = apply(out, d, _step_seed(seed, i))
    return out


def region_alpha(mask: np.ndarray, feather_px: float = 3.0) -> np.ndarray:
    """Float32 HxW alpha of a bool mask with a feathered edge.

    A Gaussian blur of the mask, sigma `feather_px` truncated at 3 sigma: alpha is exactly 0
    farther than ceil(3 * feather_px) px (per axis) from the mask; image borders do not fade
    (a full mask gives alpha 1 everywhere). Masks thinner than the feather (inscribed
    chessboard radius r < 3 * feather_px) get sigma r / 3 instead, so that a thin or tiny
    region is still distorted (alpha > ~0.5 inside) rather than faded away. feather_px <= 0
    gives the hard mask.
    """
    m = np.asarray(mask, dtype=bool)
    if feather_px <= 0 or not m.any():
        return m.astype(np.float32)
    if m.all():
        return np.ones(m.shape, np.float32)
    sigma = float(feather_px)
    # inscribed radius on the mask's bounding box grown by 1 px (cheap for small regions)
    ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
    y0, y1 = max(ys[0] - 1, 0), min(ys[-1] + 2, m.shape[0])
    x0, x1 = max(xs[0] - 1, 0), min(xs[-1] + 2, m.shape[1])
    crop = m[y0:y1, x0:x1]
    if not crop.all():
        r_in = float(ndimage.distance_transform_cdt(crop, metric="chessboard").max())
        sigma = min(sigma, r_in / 3.0)
    a = ndimage.gaussian_filter(m.astype(np.float32), sigma=sigma, mode="nearest", truncate=3.0)
    a[a > 1.0 - 1e-5] = 1.0
    a[a < 1e-7] = 0.0
    return a


def composite(original: np.ndarray, distorted: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """original + alpha * (distorted - original), exact original wherever alpha is 0."""
    out = original.copy()
    ys, xs = np.nonzero(alpha)
    if ys.size == 0:
        return out
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    a = alpha[y0:y1, x0:x1, None]
    o = original[y0:y1, x0:x1].astype(np.float32)
    blend = o + a * (distorted[y0:y1, x0:x1].astype(np.float32) - o)
    out[y0:y1, x0:x1] = _to_uint8(blend)
    return out


def apply_in_region(image: np.ndarray, mask: np.ndarray, chain: Sequence[Distortion], seed: int,
                    feather_px: float = 3.0) -> np.ndarray:
    """Apply `chain` in order to the image and composite the result into the original inside
    `mask` (bool HxW) with a feathered edge (`region_alpha`). Outside the mask, farther than
    ceil(3 * feather_px) px, the pixels equal the original exactly. A full mask distorts the
    whole image (equal to `apply_chain`)."""
    img = _check_image(image)
    mask = np.asarray(mask)
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image {img.shape[:2]}")
    alpha = region_alpha(mask.astype(bool), feather_px)
    if not alpha.any() or not chain:
        return img.copy()
    distorted = apply_chain(img, chain, seed)
    return composite(img, distorted, alpha)


def is_valid_order(first: str, second: str) -> bool:
    """Whether `second` may follow `first` in a DAO-G accumulation chain."""
    return second in ACCUMULATION_ORDERS.get(first, ())


def sample_distortion(rng: np.random.Generator, family: str | None = None,
                      severity: int | None = None, min_severity: int = 1,
                      families: tuple[str, ...] = DISTORTION_FAMILIES) -> Distortion:
    """A random distortion: family (uniform over ``families`` unless given), sub-type uniform
    within it, severity uniform in min_severity..5 unless given."""
    if family is None:
        family = families[int(rng.integers(len(families)))]
    elif family not in SUBTYPES:
        raise ValueError(f"unknown distortion family {family!r}")
    subs = SUBTYPES[family]
    subtype = subs[int(rng.integers(len(subs)))]
    if severity is None:
        severity = int(rng.integers(min_severity, 6))
    return Distortion(family, subtype, int(severity))


def accumulation_orders(families: tuple[str, ...] = DISTORTION_FAMILIES) -> dict[str, tuple[str, ...]]:
    """The paper's accumulation orders with both steps among ``families``."""
    kept = {first: tuple(s for s in seconds if s in families)
            for first, seconds in ACCUMULATION_ORDERS.items() if first in families}
    return {first: seconds for first, seconds in kept.items() if seconds}


def sample_dao_chain(rng: np.random.Generator, min_severity: int = 1,
                     families: tuple[str, ...] = DISTORTION_FAMILIES) -> list[Distortion]:
    """Two distortions in one of the paper's accumulation orders among ``families`` (first
    uniform over the orders' first families, second uniform over the families allowed after it)."""
    orders = accumulation_orders(families)
    if not orders:
        raise ValueError(f"no accumulation order has both steps among {families}")
    firsts = tuple(orders)
    first = firsts[int(rng.integers(len(firsts)))]
    seconds = orders[first]
    second = seconds[int(rng.integers(len(seconds)))]
    return [sample_distortion(rng, first, min_severity=min_severity),
            sample_distortion(rng, second, min_severity=min_severity)]


def all_distortions() -> list[Distortion]:
    """Every family x sub-type x severity."""
    return [Distortion(f, s, k) for f in PARAMS for s in PARAMS[f] for k in SEVERITIES]
