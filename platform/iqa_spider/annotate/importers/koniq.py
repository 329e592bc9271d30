"""KonIQ-10k (Hosu et al., 2020): 10,073 authentic photos, 1024x768, each its own source.

Published layout::

    koniq10k_scores_and_distributions.csv   image_name, c1..c5, c_total, MOS (1..5), SD, MOS_zscore (0..100)
    koniq10k_distributions_sets.csv         image_name, c1..c5, c_total, MOS (0..100), SD, set
    1024x768/<image_name>

The two tables name different scales `MOS`: the scores table's is the mean rating on 1..5
(beside `MOS_zscore`, the rescaled one), the sets table's is the rescaled one on 0..100. Where
the sets table is under the root (or given as --table) the split is its official one
(training and validation -> train, test -> test), the one Q-Align and DeQA-Score report on.
"""
from __future__ import annotations

from iqa_spider import storage
from iqa_spider.annotate.importers.ratings import RatedImage, Scale, as_float, import_ratings
from iqa_spider.annotate.importers.tables import cell_text, pick_column, read_rows

# Either of the published tables: the sets one first, where both are, for its official split.
TABLES = ("koniq10k_distributions_sets.csv", "koniq10k_scores_and_distributions.csv")
IMAGES = "1024x768"
OFFICIAL_SPLIT = {"training": "train", "validation": "train", "test": "test"}


def read_koniq(table_uri: str) -> tuple[list[RatedImage], Scale]:
    """The images, and the scale of the MOS column read: `MOS` on 1..5 where `MOS_zscore` is
    beside it (the scores table), else `MOS` (the sets table) or `MOS_zscore` on 0..100."""
    columns, rows = read_rows(table_uri, text_columns=("image_name",))
    name = pick_column(table_uri, columns, ("image_name",), "image")
    mos = pick_column(table_uri, columns, ("mos", "mos_zscore"), "MOS")
    scale = Scale(1.0, 5.0) if mos == "mos" and "mos_zscore" in columns else Scale(0.0, 100.0)
    has_set = "set" in columns
    items = [RatedImage(cell_text(r[name]) or None, as_float(r[mos]),
                        split=OFFICIAL_SPLIT.get(cell_text(r["set"]).lower()) if has_set else None)
             for r in rows]
    return items, scale


def import_koniq(root: str, output_uri: str, table: str | None = None, images: str | None = None,
                 split: str = "auto", test_fraction: float = 0.1) -> dict:
    if table is None:
        candidates = [storage.join(root, name) for name in TABLES]
        table = next((uri for uri in candidates if storage.exists(uri)), None)
        if table is None:
            raise FileNotFoundError(f"{root}: has neither {' nor '.join(TABLES)}")
    table_uri = table
    images_uri = images or storage.join(root, IMAGES)
    items, scale = read_koniq(table_uri)
    return import_ratings(items, dataset="koniq10k", images_uri=images_uri, output_uri=output_uri, scale=scale,
                          split=split, test_fraction=test_fraction, source={"table": table_uri})
