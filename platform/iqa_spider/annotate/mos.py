"""Import a MOS table (image, mean opinion score) as `rating` samples.

The MOS is mapped linearly from the table's scale [scale_min, scale_max] to 1..5, and the
level is the same bin rule as annotated data (truth.level_for_score): 4.2+ excellent,
3.4+ good, 2.6+ fair, 1.8+ poor, else bad. Images stay where they are (image_uri); relative
paths in the table are resolved against --images.
"""
from __future__ import annotations

import io
import logging

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from iqa_spider import storage
from iqa_spider.annotate.truth import level_for_score
from iqa_spider.data.io import write_shard
from iqa_spider.data.schema import SCHEMA_VERSION, image_id, sample_id, split_for
from iqa_spider.images import ImageError, decode_image
from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

log = logging.getLogger(__name__)


def read_mos_table(uri: str) -> list[tuple[str, float]]:
    data = storage.read_bytes(uri)
    table = pq.read_table(io.BytesIO(data)) if uri.endswith(".parquet") else pacsv.read_csv(io.BytesIO(data))
    cols = {c.lower(): c for c in table.column_names}
    img_col = next((cols[c] for c in ("image", "image_uri", "image_name", "filename", "path") if c in cols), None)
    mos_col = next((cols[c] for c in ("mos", "score", "dmos") if c in cols), None)
    if img_col is None or mos_col is None:
        raise ValueError(f"{uri}: needs an image column (image/image_uri/filename/path) and a mos column; "
                         f"has {table.column_names}")
    return [(str(i), float(m)) for i, m in zip(table.column(img_col).to_pylist(), table.column(mos_col).to_pylist())]


def mos_to_score(mos: float, scale_min: float, scale_max: float) -> float:
    if scale_max <= scale_min:
        raise ValueError("scale_max must be greater than scale_min")
    return round(1.0 + 4.0 * (min(max(mos, scale_min), scale_max) - scale_min) / (scale_max - scale_min), 4)


def import_mos(table_uri: str, images_uri: str, output_uri: str, scale_min: float = 1.0,
               scale_max: float = 5.0, test_fraction: float = 0.1) -> dict:
    rows, skipped = [], {}
    for name, mos in read_mos_table(table_uri):
        uri = name if "://" in name or name.startswith("/") else storage.join(images_uri, name)
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
        score = mos_to_score(mos, scale_min, scale_max)
        level = level_for_score(score)
        iid = image_id(data)
        answer = f"{SCORE_ANSWER_PREFIX} {level}."
        rows.append({
            "sample_id": sample_id(iid, "rating", SCORE_QUESTION, answer), "image_id": iid, "image": None,
            "image_uri": uri, "width": img.width, "height": img.height, "task": "rating", "subtask": None,
            "question": SCORE_QUESTION, "answer": answer,
            "target": {"regions": [], "target_region_ids": [], "whole_image": True,
                       "quality_level": level, "quality_score": score},
            "source_uri": uri, "split": split_for(uri, test_fraction), "schema_version": SCHEMA_VERSION,
        })
    out = output_uri if output_uri.endswith(".parquet") else storage.join(output_uri, "mos-00000.parquet")
    write_shard(rows, out)
    summary = {"imported": len(rows), "skipped": skipped, "output": out}
    log.info("MOS import: %s", summary)
    return summary
