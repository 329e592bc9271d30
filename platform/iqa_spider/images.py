"""Safe image decoding, shared by annotation, training, scoring and serving.

Every image that enters the platform goes through `decode_image`, so every job treats a
bad file the same way: an `ImageError` with a short machine-readable reason (which becomes
the `error` of a result row or a skip count), never a crash. It refuses decompression
bombs before decoding pixels, applies EXIF rotation, and turns odd modes (CMYK, 16-bit,
palette, alpha, greyscale) into 8-bit RGB.
"""
from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; huge scans beyond this are refused, not decoded
# decode_image is the door for untrusted bytes and checks the *configured* limit itself, from
# the header, before any pixel is decoded. Pillow's own process-wide limit (89.5 MP, an error at
# twice that) would otherwise decide first and quote its own number, so a user who raises
# infer.max_pixels above it could not get past it.
Image.MAX_IMAGE_PIXELS = None
MAX_ASPECT = 150.0  # the Qwen-VL image processors refuse aspect ratios above 200 (a ValueError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Leading bytes of the formats we accept, to tell images from other files whatever their name
# (WebP, "RIFF....WEBP", is checked in image_type).
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


# Pillow names the file object in some messages ("<_io.BytesIO object at 0x7f...>"): the
# address changes every run, so it never reaches an error message (rows, reports, logs).
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
_PIL_FORMAT = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/bmp": "BMP",
               "image/tiff": "TIFF", "image/webp": "WEBP"}


def deterministic(text: str) -> str:
    """An exception's text without object reprs: the same input gives the same message."""
    return _OBJECT_REPR.sub("", text).strip()


class ImageError(ValueError):
    """An input that is not a usable image. `reason` is short and stable (for counting);
    `size` is (width, height) where the header was read."""

    def __init__(self, reason: str, detail: str = "", size: tuple[int, int] | None = None):
        self.reason, self.detail, self.size = reason, deterministic(detail), size
        super().__init__(f"{reason}: {self.detail}" if self.detail else reason)


def image_type(head: bytes) -> str | None:
    """The MIME type that the first bytes (16 are enough) name; None: not a supported image format."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if head.startswith(magic)), None)


def looks_like_image(head: bytes) -> bool:
    """True if the first bytes are those of a supported image format."""
    return image_type(head) is not None


# EXIF orientations that turn the image a quarter (decode_image applies them: width and height swap)
_QUARTER_TURNS = (5, 6, 7, 8)


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of the image decode_image returns (its EXIF orientation applied), from
    the header alone: nothing decoded. None if the header cannot be read."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            return (h, w) if img.getexif().get(0x0112) in _QUARTER_TURNS else (w, h)
    except Exception:  # noqa: BLE001 - decode_image gives the reason; this is only an estimate
        return None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, fit_pixels: int | None = None) -> Image.Image:
    """bytes -> 8-bit RGB PIL image, or ImageError(reason).

    ``fit_pixels``: decode no larger than needed for that many pixels (a model whose processor
    resizes to at most that). JPEG is decoded at 1/2, 1/4 or 1/8 scale by the codec itself
    (Pillow's draft mode), other formats are reduced in their own mode before the RGB
    conversion; the aspect ratio is kept.
    """
    if not data:
        raise ImageError("empty", "zero bytes")
    mime, size = image_type(data[:16]), None
    if mime is None:
        raise ImageError("not_an_image", "unknown file signature")
    try:
        img = Image.open(io.BytesIO(data))
        size = w, h = img.size  # header only: nothing decoded yet
        if w * h > max_pixels:
            raise ImageError("too_many_pixels", f"{w}x{h} exceeds the limit of {max_pixels} pixels", size)
        if fit_pixels and w * h > fit_pixels:
            scale = math.sqrt(fit_pixels / (w * h))
            img.thumbnail((max(1, math.floor(w * scale)), max(1, math.floor(h * scale))),
                          Image.Resampling.BICUBIC, reducing_gap=2.0)  # before load: JPEG uses draft()
        img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        # The signature is one we accept, so the file is that format's, damaged (a bad
        # checksum, a cut header): corrupt, in the format reader's own words.
        raise ImageError("corrupt", _why_unreadable(data, mime)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError("corrupt", str(exc).splitlines()[0] if str(exc) else type(exc).__name__, size) from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def _why_unreadable(data: bytes, mime: str | None) -> str:
    """What the reader of the sniffed format says about bytes Pillow could not identify."""
    Image.init()
    factory = Image.OPEN.get(_PIL_FORMAT.get(mime or "", ""), (None, None))[0]
    if factory is not None:
        try:
            factory(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - any reader error is the reason we want
            if str(exc):
                return str(exc).splitlines()[0]
    return f"the {mime or 'image'} header cannot be read"


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def prepare_image(image: Image.Image) -> Image.Image:
    """8-bit RGB, with an aspect ratio the Qwen-VL processors accept (else ImageError). The one
    gate every path into the model uses: training, inference, scoring, serving."""
    w, h = image.size
    if w < 1 or h < 1:
        raise ImageError("empty", f"{w}x{h} image")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise ImageError("bad_aspect_ratio", f"{w}x{h} is more elongated than 1:{MAX_ASPECT:g}")
    return to_rgb(image)


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; PNG keeps distortions exact
    return buf.getvalue()


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so the longer side is at most max_side (never enlarges)."""
    w, h = img.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
