"""Any (image, MOS) table -> `rating` samples (`iqa-spider data import-mos`).

The table is CSV, Parquet or .xlsx with an image column (image / image_uri / image_name /
filename / path) and an opinion column (mos / score / dmos). A `dmos` column is read as lower =
better and inverted; KADID-10k's, which is not, has its own importer (`kadid10k`). An optional
`reference` (or `ref_img`, `source`) column names each image's pristine source, so its versions
share a split; without one each image is its own source.
"""
from __future__ import annotations

import dataclasses

from iqa_spider.annotate.importers.ratings import RatedImage, Scale, as_float, import_ratings
from iqa_spider.annotate.importers.tables import cell_text, pick_column, read_rows

IMAGE_COLUMNS = ("image", "image_uri", "image_name", "filename", "path")
MOS_COLUMNS = ("mos", "score", "dmos")
REFERENCE_COLUMNS = ("reference", "ref_img", "source")


def read_mos_table(uri: str) -> tuple[list[RatedImage], bool]:
    """The table's images in order, and whether its opinion column is a DMOS (higher = worse)."""
    columns, rows = read_rows(uri, text_columns=IMAGE_COLUMNS + REFERENCE_COLUMNS)
    img_col = pick_column(uri, columns, IMAGE_COLUMNS, "image")
    mos_col = pick_column(uri, columns, MOS_COLUMNS, "mos")
    ref_col = next((c for c in REFERENCE_COLUMNS if c in columns), None)
    items = [RatedImage(cell_text(r[img_col]) or None, as_float(r[mos_col]),
                        (cell_text(r[ref_col]) or None) if ref_col else None) for r in rows]
    return items, mos_col == "dmos"


def import_mos(table_uri: str, images_uri: str, output_uri: str, scale_min: float = 1.0,
               scale_max: float = 5.0, test_fraction: float = 0.1, split: str = "auto") -> dict:
    """Write the table's images as rating samples; returns the import's record (ratings.import_ratings)."""
    scale = Scale(scale_min, scale_max)  # a bad scale is refused before the table is read
    items, dmos = read_mos_table(table_uri)
    return import_ratings(items, dataset="mos", images_uri=images_uri, output_uri=output_uri,
                          scale=dataclasses.replace(scale, higher_is_better=not dmos),
                          split=split, test_fraction=test_fraction, source={"table": table_uri})
