"""SPAQ (Fang et al., 2020): 11,125 smartphone photos, each its own source.

Published layout::

    Annotations/MOS and Image attribute scores.xlsx   Image name, MOS (0..100), Brightness, ...
    TestImage/<Image name>

A CSV export of the sheet, with the same columns, reads the same (`--table`). The photos are
up to 4000x4000: the anchors resize their shorter side to 512 first, and so does the model's
processor (`infer.max_pixels`), so nothing needs resizing here.
"""
from __future__ import annotations

from iqa_spider import storage
from iqa_spider.annotate.importers.ratings import RatedImage, Scale, as_float, import_ratings
from iqa_spider.annotate.importers.tables import cell_text, pick_column, read_rows

TABLE = "Annotations/MOS and Image attribute scores.xlsx"
IMAGES = "TestImage"
SCALE = Scale(0.0, 100.0)


def read_spaq(table_uri: str) -> list[RatedImage]:
    columns, rows = read_rows(table_uri, text_columns=("image name", "image_name"))
    name = pick_column(table_uri, columns, ("image name", "image_name"), "image")
    mos = pick_column(table_uri, columns, ("mos",), "MOS")
    return [RatedImage(cell_text(r[name]) or None, as_float(r[mos])) for r in rows]


def import_spaq(root: str, output_uri: str, table: str | None = None, images: str | None = None,
                split: str = "auto", test_fraction: float = 0.1) -> dict:
    table_uri = table or storage.join(root, TABLE)
    images_uri = images or storage.join(root, IMAGES)
    return import_ratings(read_spaq(table_uri), dataset="spaq", images_uri=images_uri, output_uri=output_uri,
                          scale=SCALE, split=split, test_fraction=test_fraction, source={"table": table_uri})
