"""Import a MOS table (image, mean opinion score) as `rating` samples.

The MOS is mapped linearly from the table's scale [scale_min, scale_max] to 1..5, and the
level is the same bin rule as annotated data (truth.level_for_score): 4.2+ excellent,
3.4+ good, 2.6+ fair, 1.8+ poor, else bad. A `dmos` column (higher = worse) is inverted:
scale_min maps to 5 and scale_max to 1. Images stay where they are (image_uri); relative
paths in the table are resolved against --images (local ones are stored as absolute paths).

Every table row is either imported or counted under a skip reason, never fatal: the image
is missing or unreadable (`unreadable`), is not a usable image (the reasons of
`images.decode_image`: `empty`, `not_an_image`, `corrupt`, `too_many_pixels`), has no
numeric MOS (`no_mos`), or repeats an image already imported (`duplicate`: the same
resolved URI, or the same bytes with the same level, which would give a duplicate
sample_id), or has no image name (`no_image`). A MOS outside [scale_min, scale_max] is clamped to the scale.
"""
from __future__ import annotations

import io
import logging
import math
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from iqa_spider import storage
from iqa_spider.annotate.truth import level_for_score
from iqa_spider.data.io import write_shard
from iqa_spider.data.schema import SCHEMA_VERSION, image_id, sample_id, split_for
from iqa_spider.images import ImageError, decode_image
from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

log = logging.getLogger(__name__)


IMAGE_COLUMNS = ("image", "image_uri", "image_name", "filename", "path")
MOS_COLUMNS = ("mos", "score", "dmos")


def _columns(uri: str, names: list[str]) -> tuple[str, str]:
    cols = {c.lower(): c for c in names}
    img_col = next((cols[c] for c in IMAGE_COLUMNS if c in cols), None)
    mos_col = next((cols[c] for c in MOS_COLUMNS if c in cols), None)
    if img_col is None or mos_col is None:
        raise ValueError(f"{uri}: needs an image column ({'/'.join(IMAGE_COLUMNS)}) and a mos column "
                         f"({'/'.join(MOS_COLUMNS)}); has {names}")
    return img_col, mos_col


def _as_float(value) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def read_mos_table(uri: str) -> tuple[list[tuple[str | None, float | None]], bool]:
    """(image name, opinion score) per table row, in order, None where a cell is empty (or
    not a number); and whether the opinion column is a DMOS (higher = worse)."""
    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        img_col, mos_col = _columns(uri, table.column_names)
    else:
        table = pacsv.read_csv(io.BytesIO(data))
        img_col, mos_col = _columns(uri, table.column_names)
        if not pa.types.is_string(table.schema.field(img_col).type):
            # names such as 0001 would otherwise be read as the integer 1
            table = pacsv.read_csv(io.BytesIO(data),
                                   convert_options=pacsv.ConvertOptions(column_types={img_col: pa.string()}))
    rows = [(None if i is None or not str(i).strip() else str(i).strip(), _as_float(m))
            for i, m in zip(table.column(img_col).to_pylist(), table.column(mos_col).to_pylist())]
    return rows, mos_col.lower() == "dmos"


def resolve(name: str, images_uri: str) -> str:
    """A table's image name -> URI: URIs and absolute paths as they are, others under images_uri."""
    uri = name if "://" in name or name.startswith("/") else storage.join(images_uri, name)
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return uri


def mos_to_score(mos: float, scale_min: float, scale_max: float, dmos: bool = False) -> float:
    """Map a MOS on [scale_min, scale_max] linearly to 1..5 (clamped); a DMOS is inverted
    (scale_min -> 5, scale_max -> 1), since a higher DMOS means a worse image."""
    if scale_max <= scale_min:
        raise ValueError("scale_max must be greater than scale_min")
    frac = (min(max(mos, scale_min), scale_max) - scale_min) / (scale_max - scale_min)
    return round(1.0 + 4.0 * ((1.0 - frac) if dmos else frac), 4)


def import_mos(table_uri: str, images_uri: str, output_uri: str, scale_min: float = 1.0,
               scale_max: float = 5.0, test_fraction: float = 0.1) -> dict:
    """Write the table's images as `rating` rows to `output_uri`; returns a summary with
    `rows` (table rows), `imported` and `skipped` ({reason: count}), and `output`."""
    if scale_max <= scale_min:
        raise ValueError(f"scale_max ({scale_max}) must be greater than scale_min ({scale_min})")
    rows, skipped = [], {}
    seen_uris: set[str] = set()
    seen_samples: set[str] = set()
    table, dmos = read_mos_table(table_uri)
    for name, mos in table:
        if name is None:
            skipped["no_image"] = skipped.get("no_image", 0) + 1
            log.warning("skipped a row of %s without an image name", table_uri)
            continue
        uri = resolve(name, images_uri)
        if mos is None:
            skipped["no_mos"] = skipped.get("no_mos", 0) + 1
            log.warning("skipped %s: no numeric MOS", uri)
            continue
        if uri in seen_uris:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            log.warning("skipped %s: listed more than once", uri)
            continue
        seen_uris.add(uri)
        try:
            data = storage.read_bytes(uri)
            img = decode_image(data)
        except ImageError as exc:
            skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
            log.warning("skipped %s: %s", uri, exc)
            continue
        except OSError as exc:
            skipped["unreadable"] = skipped.get("unreadable", 0) + 1
            log.warning("skipped %s: unreadable (%s)", uri, exc)
            continue
        score = mos_to_score(mos, scale_min, scale_max, dmos)
        level = level_for_score(score)
        iid = image_id(data)
        answer = f"{SCORE_ANSWER_PREFIX} {level}."
        sid = sample_id(iid, "rating", SCORE_QUESTION, answer)
        if sid in seen_samples:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            log.warning("skipped %s: the same image with the same level was already imported", uri)
            continue
        seen_samples.add(sid)
        rows.append({
            "sample_id": sid, "image_id": iid, "image": None,
            "image_uri": uri, "width": img.width, "height": img.height, "task": "rating", "subtask": None,
            "question": SCORE_QUESTION, "answer": answer,
            "target": {"regions": [], "target_region_ids": [], "whole_image": True,
                       "quality_level": level, "quality_score": score},
            "source_uri": uri, "split": split_for(iid, test_fraction), "schema_version": SCHEMA_VERSION,
        })
    out = output_uri if output_uri.endswith(".parquet") else storage.join(output_uri, "mos-00000.parquet")
    write_shard(rows, out)
    summary = {"rows": len(table), "imported": len(rows), "skipped": skipped, "output": out}
    log.info("MOS import: %s", summary)
    return summary
