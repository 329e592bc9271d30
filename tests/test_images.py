"""decode_image, the one door for untrusted image bytes: the configured pixel limit decides,
and every refusal has a stable reason and a deterministic message."""
import io

import numpy as np
from PIL import Image
import pytest

from iqa_spider.images import ImageError, decode_image


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def refusal(data: bytes, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kw)
    return info.value


def test_the_configured_pixel_limit_decides_not_pillows():
    """A 100 MP image is past Pillow's own 89.5 MP limit. Under a lower configured limit the
    refusal quotes that limit and the size from the header; under a higher one the file gets
    as far as decoding (cut in half, it is then corrupt, which proves the limit let it by)."""
    data = png(Image.new("1", (10_000, 10_000)))   # 1-bit and uniform: a few KB
    low = refusal(data, max_pixels=64_000_000)
    assert low.reason == "too_many_pixels" and "limit of 64000000 pixels" in str(low), low
    assert low.size == (10_000, 10_000) and "10000x10000" in str(low)
    high = refusal(data[: len(data) // 2], max_pixels=200_000_000)
    assert high.reason == "corrupt", high
    assert high.size == (10_000, 10_000)


def test_a_png_with_a_bad_checksum_is_corrupt_with_the_same_message_every_time():
    data = bytearray(png(Image.fromarray(np.zeros((8, 8, 3), np.uint8))))
    data[29] ^= 0xFF                                 # the IHDR chunk's CRC: the signature stays valid
    errors = [refusal(bytes(data)) for _ in range(2)]
    assert {e.reason for e in errors} == {"corrupt"}
    assert str(errors[0]) == str(errors[1]) and "0x" not in str(errors[0]) and "object at" not in str(errors[0])
    assert "checksum" in str(errors[0]), errors[0]   # in the PNG reader's own words


def test_other_refusals_keep_their_reasons():
    assert refusal(b"").reason == "empty"
    assert refusal(b"GIF89a but not really").reason == "corrupt"
    assert refusal(b"just text, not an image").reason == "not_an_image"
    assert decode_image(png(Image.new("RGBA", (5, 4)))).size == (5, 4)
