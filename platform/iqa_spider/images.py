"""Safe image decoding, shared by annotation, training, scoring and serving.

Every image that enters the platform goes through `decode_image`, so every job treats a
bad file the same way: an `ImageError` with a short machine-readable reason (which becomes
the `error` of a result row or a skip count), never a crash. It refuses decompression
bombs before decoding pixels, applies EXIF rotation, and turns odd modes (CMYK, 16-bit,
palette, alpha, greyscale) into 8-bit RGB.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; huge scans beyond this are refused, not decoded
MAX_ASPECT = 150.0  # the Qwen-VL image processors refuse aspect ratios above 200 (a ValueError)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Leading bytes of the formats we accept, to tell images from other files whatever their name
# (WebP, "RIFF....WEBP", is checked in image_type).
_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


class ImageError(ValueError):
    """An input that is not a usable image. `reason` is short and stable (for counting)."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def image_type(head: bytes) -> str | None:
    """The MIME type that the first bytes (16 are enough) name; None: not a supported image format."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if head.startswith(magic)), None)


def looks_like_image(head: bytes) -> bool:
    """True if the first bytes are those of a supported image format."""
    return image_type(head) is not None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """bytes -> 8-bit RGB PIL image, or ImageError(reason)."""
    if not data:
        raise ImageError("empty", "zero bytes")
    if not looks_like_image(data[:16]):
        raise ImageError("not_an_image", "unknown file signature")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # header only: nothing decoded yet
            if w * h > max_pixels:
                raise ImageError("too_many_pixels", f"{w}x{h} exceeds the limit of {max_pixels} pixels")
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageError("corrupt", str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


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
