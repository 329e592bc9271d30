"""KADID-10k (Lin, Hosu and Saupe, 2019): 81 pristine images x 25 distortions x 5 levels.

Published layout::

    dmos.csv          dist_img, ref_img, dmos, var
    images/I01.png    the references, and I01_01_01.png ... (reference, type 01..25, level 1..5)

Its `dmos` is a mean opinion on 1..5 where higher is better, despite the name, so it is not
inverted. The split is by reference: the 125 versions of one photo share a side.
"""
from __future__ import annotations

import re

from iqa_spider import storage
from iqa_spider.annotate.importers.ratings import RatedImage, Scale, as_float, import_ratings, parse_synthetic_name
from iqa_spider.annotate.importers.tables import cell_text, pick_column, read_rows

TABLE = "dmos.csv"
IMAGES = "images"
SCALE = Scale(1.0, 5.0)
NAME = re.compile(r"^(?P<ref>I\d+)_(?P<type>\d+)_(?P<level>\d+)\.\w+$", re.IGNORECASE)

# The 25 types in the set's order, with our family where one is the same distortion; the rest
# are kept as `other` under their own names (docs/datasets-standard.md has the table).
TYPES: tuple[tuple[str, str | None], ...] = (
    ("gaussian blur", "blur"), ("lens blur", "blur"), ("motion blur", "blur"),
    ("color diffusion", None), ("color shift", None), ("color quantization", "quantization"),
    ("color saturation 1", "saturate_weaken"),      # HSV saturation scaled down
    ("color saturation 2", "saturate_strengthen"),  # Lab chroma scaled up
    ("jpeg2000", "compression"), ("jpeg", "compression"),
    ("white noise", "noise"), ("white noise in color component", "noise"), ("impulse noise", "noise"),
    ("multiplicative noise", "noise"), ("denoise", None),
    ("brighten", "brighten"), ("darken", "darken"), ("mean shift", None),
    ("jitter", None), ("non-eccentricity patch", None), ("pixelate", "pixelate"), ("quantization", "quantization"),
    ("color block", None), ("high sharpen", "oversharpen"), ("contrast change", None),
)


def parse_name(name: str) -> tuple[str, dict] | None:
    """'I01_08_03.png' -> (its reference, its distortion), or None if the name is not in the set's scheme."""
    return parse_synthetic_name(name, NAME, TYPES, "kadid10k")


def read_kadid(table_uri: str) -> list[RatedImage]:
    columns, rows = read_rows(table_uri, text_columns=("dist_img", "ref_img"))
    dist = pick_column(table_uri, columns, ("dist_img",), "distorted image")
    mos = pick_column(table_uri, columns, ("dmos", "mos"), "MOS")
    items = []
    for r in rows:
        name = cell_text(r[dist]) or None
        parsed = parse_name(name) if name else None
        if name and parsed is None:
            raise ValueError(f"{table_uri}: {name!r} is not a KADID-10k name (I01_08_03.png)")
        ref = str(r.get("ref_img") or "").rsplit(".", 1)[0].upper() or (parsed[0] if parsed else None)
        items.append(RatedImage(name, as_float(r[mos]), reference=ref, distortion=parsed[1] if parsed else None))
    return items


def import_kadid(root: str, output_uri: str, table: str | None = None, images: str | None = None,
                 split: str = "auto", test_fraction: float = 0.1) -> dict:
    table_uri = table or storage.join(root, TABLE)
    images_uri = images or storage.join(root, IMAGES)
    return import_ratings(read_kadid(table_uri), dataset="kadid10k", images_uri=images_uri, output_uri=output_uri,
                          scale=SCALE, split=split, test_fraction=test_fraction, source={"table": table_uri})
