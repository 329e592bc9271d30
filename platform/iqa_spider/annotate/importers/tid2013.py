"""TID2013 (Ponomarenko et al., 2015): 25 references x 24 distortions x 5 levels.

Published layout::

    mos_with_names.txt        one "MOS name" line per image, e.g. "5.51429 i01_01_1.bmp"
    distorted_images/         i01_01_1.bmp ... (reference, type 01..24, level 1..5)
    reference_images/         I01.BMP ...

The MOS is on 0..9, higher is better. Names are matched to files without regard to case (the
set's list and folder do not agree on it everywhere). The split is by reference.
"""
from __future__ import annotations

import re

from iqa_spider import storage
from iqa_spider.annotate.importers.ratings import RatedImage, Scale, as_float, import_ratings, parse_synthetic_name

TABLE = "mos_with_names.txt"
IMAGES = "distorted_images"
SCALE = Scale(0.0, 9.0)
NAME = re.compile(r"^(?P<ref>i\d+)_(?P<type>\d+)_(?P<level>\d+)\.\w+$", re.IGNORECASE)

TYPES: tuple[tuple[str, str | None], ...] = (
    ("additive gaussian noise", "noise"), ("additive noise in color components", "noise"),
    ("spatially correlated noise", "noise"), ("masked noise", "noise"), ("high frequency noise", "noise"),
    ("impulse noise", "noise"), ("quantization noise", "quantization"), ("gaussian blur", "blur"),
    ("image denoising", None), ("jpeg compression", "compression"), ("jpeg2000 compression", "compression"),
    ("jpeg transmission errors", None), ("jpeg2000 transmission errors", None),
    ("non eccentricity pattern noise", None), ("local block-wise distortions", None),
    ("mean shift", None), ("contrast change", None), ("change of color saturation", None),
    ("multiplicative gaussian noise", "noise"), ("comfort noise", None),
    ("lossy compression of noisy images", None), ("color quantization with dither", "quantization"),
    ("chromatic aberrations", None), ("sparse sampling and reconstruction", None),
)


def parse_name(name: str) -> tuple[str, dict] | None:
    """'i01_08_3.bmp' -> (its reference, its distortion), or None if the name is not in the set's scheme."""
    return parse_synthetic_name(name, NAME, TYPES, "tid2013")


def read_tid(table_uri: str) -> list[RatedImage]:
    items = []
    for n, line in enumerate(storage.read_bytes(table_uri).decode("utf-8", "replace").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise ValueError(f"{table_uri}, line {n}: expected 'MOS name', got {line!r}")
        mos, name = parts
        parsed = parse_name(name)
        if parsed is None:
            raise ValueError(f"{table_uri}, line {n}: {name!r} is not a TID2013 name (i01_08_3.bmp)")
        items.append(RatedImage(name, as_float(mos), reference=parsed[0], distortion=parsed[1]))
    return items


def case_blind_resolver(images_uri: str):
    """name -> the file under images_uri whose name matches it regardless of case (one listing)."""
    by_lower = {uri.rsplit("/", 1)[-1].lower(): uri for uri in storage.iter_files(images_uri)}

    def resolve(name: str) -> str:
        return by_lower.get(name.lower(), storage.join(images_uri, name))
    return resolve


def import_tid(root: str, output_uri: str, table: str | None = None, images: str | None = None,
               split: str = "auto", test_fraction: float = 0.1) -> dict:
    table_uri = table or storage.join(root, TABLE)
    images_uri = images or storage.join(root, IMAGES)
    items = read_tid(table_uri)
    return import_ratings(items, dataset="tid2013", images_uri=images_uri, output_uri=output_uri, scale=SCALE,
                          split=split, test_fraction=test_fraction, resolver=case_blind_resolver(images_uri),
                          source={"table": table_uri})
