"""decode_image, the one door for untrusted image bytes: the configured pixel limit decides,
and every refusal has a stable reason and a deterministic message."""
import io

import numpy as np
import pytest
from PIL import Image

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


def test_a_reduced_decode_keeps_the_shape_and_the_header_size_its_orientation():
    """decode_image(fit_pixels) decodes no larger (JPEG by the codec's reduced scale), keeps the
    aspect ratio; header_size gives the size decode_image's image has at full scale, EXIF
    rotation included (a quarter turn swaps width and height)."""
    from iqa_spider.images import header_size

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6   # rotate 90 degrees on display
    Image.new("RGB", (1200, 800), (10, 200, 30)).save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    assert header_size(data) == (800, 1200) == decode_image(data).size
    small = decode_image(data, fit_pixels=60_000)
    assert small.size[0] * small.size[1] <= 60_000 and abs(small.size[0] / small.size[1] - 800 / 1200) < 0.02
    plain = png(Image.new("RGB", (300, 200)))
    assert header_size(plain) == (300, 200) and decode_image(plain, fit_pixels=6000).size == (94, 63)
    assert header_size(b"not an image") is None
