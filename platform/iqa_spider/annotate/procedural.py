"""Generated pristine images: as many distinct clean sources as a run wants, none downloaded.

The bundled collection is about 22 photos. Split by photo, a model trains on 16-18 contents.
A generated source is a new content every time, so a user (or a benchmark) can ask whether
more distinct contents help more than more views of the same few. For the project's small
model at its CPU budget they did not: bench/seeing.py --train-content, BENCHMARKS.md
(held-out photos 0.28 with generated contents, 0.31 with photo crops; the model underfits the
photos rather than learning them by heart).

The generator is the dead-leaves model (Matheron; Lee, Mumford and Huang 2001): opaque shapes
dropped on top of each other, with sizes drawn from a power law. It is the standard synthetic
stand-in for natural images in low-level vision (camera texture charts, ISO 19567-2; training
denoisers on synthetic data, Achddou et al. 2021) because it has what those tasks look at:
sharp occluding edges at every orientation and scale, flat and smoothly shaded regions, and a
natural 1/f-like spectrum. Those are exactly where blur, noise, compression and colour damage
show. Each image has its own small palette (photos have colour schemes), some shapes carry a
shading gradient or a fine grating (texture), and the whole is lit by a smooth field. It is
drawn at twice the size and reduced, so its edges are anti-aliased like a camera's, not
jagged: a pristine source must not look pixelated or sharpened itself.
"""
from __future__ import annotations

import colorsys
import logging

import numpy as np
from PIL import Image

from iqa_spider import storage
from iqa_spider.images import encode_png

# Shape radii follow p(r) ~ r^-3 (scale invariance) between these fractions of the side.
MIN_RADIUS_FRAC, MAX_RADIUS_FRAC = 0.012, 0.35
SUPERSAMPLE = 2
log = logging.getLogger(__name__)


def _radii(rng: np.random.Generator, n: int, r_min: float, r_max: float) -> np.ndarray:
    """n radii from p(r) ~ r^-3 on [r_min, r_max], by inverting its CDF."""
    u = rng.random(n)
    return (r_min ** -2 - u * (r_min ** -2 - r_max ** -2)) ** -0.5


def _palette(rng: np.random.Generator) -> np.ndarray:
    """4-8 base colours of one image (0..1 RGB): a few hues, mostly muted, varied brightness."""
    k = int(rng.integers(4, 9))
    hue = (rng.random() + rng.normal(0, 0.12, k)) % 1.0
    sat = np.clip(rng.beta(1.5, 2.5, k), 0, 1)
    val = np.clip(rng.beta(2.0, 1.6, k), 0.05, 1)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)])


def dead_leaves(rng: np.random.Generator, side: int = 448, leaves: int = 2500) -> np.ndarray:
    """One side x side x 3 uint8 RGB dead-leaves image drawn from `rng`."""
    s = side * SUPERSAMPLE
    palette = _palette(rng)
    # Background: one palette colour (it shows where few leaves fall; the light below shades it).
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    canvas = np.empty((s, s, 3), np.float32)
    canvas[:] = palette[rng.integers(len(palette))]
    # In random order, as the model has it: about 4-5 layers deep on average, so the canvas is
    # covered and large shapes show through between the small ones.
    for r in _radii(rng, leaves, MIN_RADIUS_FRAC * s, MAX_RADIUS_FRAC * s):
        cy, cx = rng.uniform(-0.1, 1.1, 2) * s
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, s)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, s)
        if y0 >= y1 or x0 >= x1:
            continue
        py, px = yy[y0:y1, x0:x1] * s - cy, xx[y0:y1, x0:x1] * s - cx
        kind = rng.random()
        a = rng.uniform(0, np.pi)  # the shape's angle, in the shape's own axes (u, v)
        u, v = py * np.cos(a) + px * np.sin(a), -py * np.sin(a) + px * np.cos(a)
        if kind < 0.6:  # a disc, or an ellipse at any angle
            e = rng.uniform(0.4, 1.0)
            inside = (u / r) ** 2 + (v / (r * e)) ** 2 <= 1
        else:  # a rotated rectangle: straight edges
            e = rng.uniform(0.2, 1.0)
            inside = (np.abs(u) <= r) & (np.abs(v) <= r * e)
        if not inside.any():
            continue
        colour = np.clip(palette[rng.integers(len(palette))] + rng.normal(0, 0.06, 3), 0, 1)
        fill = np.broadcast_to(colour, inside.shape + (3,)).copy()
        texture = rng.random()
        if texture < 0.25:  # shaded: a linear gradient across the shape
            g = rng.normal(0, 0.35, 2)
            fill *= (1 + (py * g[0] + px * g[1]) / (2 * r))[..., None]
        elif texture < 0.4:  # a fine grating (fabric, grass, brick-like detail)
            period = rng.uniform(3, 12) * SUPERSAMPLE
            a = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * (py * np.cos(a) + px * np.sin(a)) / period)
            fill *= (1 + rng.uniform(0.05, 0.25) * wave)[..., None]
        region = canvas[y0:y1, x0:x1]
        region[inside] = fill[inside]
    # Smooth illumination over the whole scene.
    g = rng.normal(0, 0.25, 3)
    light = 1 + g[0] * (yy - 0.5) + g[1] * (xx - 0.5) + g[2] * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2)
    canvas = np.clip(canvas * light[..., None], 0, 1)
    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    return np.asarray(img.resize((side, side), Image.Resampling.BOX))


def write_procedural_images(out_uri: str, count: int, seed: int = 0, side: int = 448,
                            progress: bool = False) -> list[str]:
    """Write `count` dead-leaves PNGs (image i drawn from seed [seed, i]: the same set on every
    machine, and a larger count only adds images) to `out_uri`; returns their URIs. A file
    already there is kept, so a re-run after an interruption only draws what is missing."""
    uris = []
    for i in range(count):
        uri = storage.join(out_uri, f"leaves_{seed}_{side}_{i:05d}.png")
        if not storage.exists(uri):
            storage.write_bytes(uri, encode_png(dead_leaves(np.random.default_rng([seed, i]), side)))
        uris.append(uri)
        if progress and (i + 1) % 200 == 0:
            log.info("generated %d/%d images", i + 1, count)
    return uris
