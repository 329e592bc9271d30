"""The result contract (docs/architecture.md, "Result"): its schema and its one row builder.

Batch scoring writes these rows to Parquet and serving returns them as JSON, so both give the
same fields. `RESULT_SCHEMA` is the one definition: each field's description is in its
metadata, and the Serve API's response model is generated from it (`serve.schemas`). Adding a
field is two lines of this module: the schema's field and `result_row`'s parameter.

A region entry is one point of a grounding answer. An answer about the whole image has a null
point and the full mask; an answer that names no position has a null point and no mask.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from iqa_spider.data import rle
from iqa_spider.data.schema import MASK_RLE
from iqa_spider.images import deterministic

if TYPE_CHECKING:  # pragma: no cover
    from iqa_spider.infer.predictor import Analysis, Grounding

def _field(name: str, type_: pa.DataType, description: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": description})


REGION_RESULT = pa.struct([
    _field("query", pa.string(), "the grounding question", nullable=False),
    _field("answer", pa.string(), "the model's answer", nullable=False),
    _field("point_x", pa.float32(), "the point's x in pixels (null: the whole image, or no position named)"),
    _field("point_y", pa.float32(), "the point's y in pixels"),
    _field("p_right", pa.float32(), "p(right) at the horizontal position word"),
    _field("p_bottom", pa.float32(), "p(bottom) at the vertical position word"),
    _field("mask_rle", MASK_RLE, "the mask as COCO RLE {size: [h, w], counts: str}"),
    _field("mask_area", pa.int64(), "the mask's area in pixels"),
    _field("bbox", pa.list_(pa.float32()), "x0, y0, x1, y1 of the mask in 0..1"),
])

RESULT_SCHEMA = pa.schema([
    _field("image_uri", pa.string(), "where the image came from (null for an upload)"),
    _field("image_sha256", pa.string(), "sha256 of the input bytes as received", nullable=False),
    _field("width", pa.int32(), "pixels after EXIF rotation (null if the image could not be decoded)"),
    _field("height", pa.int32(), "pixels after EXIF rotation"),
    _field("score", pa.float32(), "Q-Align score 1..5"),
    _field("level", pa.string(), "the most probable level word"),
    _field("level_probs", pa.list_(pa.float32()), "p(excellent, good, fair, poor, bad), sums to 1"),
    _field("description", pa.string(), "the global description (null if not asked)"),
    _field("regions", pa.list_(REGION_RESULT), "one entry per point of each grounding answer", nullable=False),
    _field("model_uri", pa.string(), "what was loaded"),
    _field("model_version", pa.string(), "the MLflow registry version (null for a plain directory)"),
    _field("error", pa.string(), 'null, or why this input could not be scored (e.g. "corrupt: ...")'),
    _field("scored_at", pa.timestamp("us", tz="UTC"), "UTC time of scoring (ISO 8601 in JSON)", nullable=False),
])

RESULT_FIELDS: tuple[str, ...] = tuple(RESULT_SCHEMA.names)


def _mask_fields(mask) -> dict[str, Any]:
    if mask is None:
        return {"mask_rle": None, "mask_area": None, "bbox": None}
    return {"mask_rle": rle.encode(mask), "mask_area": int(mask.sum()), "bbox": rle.bbox_normalized(mask)}


def region_entries(g: Grounding) -> list[dict]:
    """Result-contract region entries of one grounding answer (one per point)."""
    base = {"query": g.query, "answer": g.answer}
    if g.whole_image:
        return [{**base, "point_x": None, "point_y": None, "p_right": None, "p_bottom": None,
                 **_mask_fields(g.mask)}]
    if not g.points:
        return [{**base, "point_x": None, "point_y": None, "p_right": None, "p_bottom": None,
                 **_mask_fields(None)}]
    out = []
    for k, p in enumerate(g.points):
        mask = g.masks[k] if k < len(g.masks) else (g.mask if len(g.points) == 1 else None)
        out.append({**base, "point_x": float(p.x), "point_y": float(p.y), "p_right": float(p.p_right),
                    "p_bottom": float(p.p_bottom), **_mask_fields(mask)})
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def result_row(image_uri: str | None, image_sha256: str, width: int | None, height: int | None, *,
               score: Mapping[str, Any] | None = None, description: str | None = None,
               regions: Sequence[dict] = (), model_uri: str | None = None, model_version: Any = None,
               error: str | None = None, scored_at: dt.datetime | None = None) -> dict:
    """The one builder of a result row: every producer (the predictor, batch scoring through
    its actors or through Serve, the Serve API) ends here, so a new field is added here and
    in `RESULT_SCHEMA`. ``score``: ``{"score", "level", "level_probs"}``, or None."""
    return {
        "image_uri": image_uri,
        "image_sha256": image_sha256,
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "score": float(score["score"]) if score else None,
        "level": score["level"] if score else None,
        "level_probs": [float(p) for p in score["level_probs"]] if score else None,
        "description": description,
        "regions": list(regions),
        "model_uri": model_uri,
        "model_version": None if model_version is None else str(model_version),
        "error": error,
        "scored_at": scored_at or _now(),
    }


def analysis_row(a: Analysis, image_uri: str | None, image_sha256: str, model_uri: str | None = None,
                 model_version: str | None = None, scored_at: dt.datetime | None = None) -> dict:
    """One result row from a predictor/grounding-head analysis."""
    score = ({"score": a.score.score, "level": a.score.level, "level_probs": a.score.level_probs}
             if a.score else None)
    return result_row(image_uri, image_sha256, a.width, a.height, score=score, description=a.description,
                      regions=[e for g in a.regions for e in region_entries(g)], model_uri=model_uri,
                      model_version=model_version, scored_at=scored_at)


def inference_error(exc: BaseException) -> str:
    """The ``error`` of an input the model failed on: its reason, the exception, no object reprs."""
    return deterministic(f"inference_failed: {type(exc).__name__}: {exc}")[:500]


def error_row(image_uri: str | None, image_sha256: str, error: str, width: int | None = None,
              height: int | None = None, model_uri: str | None = None, model_version: str | None = None,
              scored_at: dt.datetime | None = None) -> dict:
    """The row of an input that could not be scored: every prediction field null, ``error`` set."""
    return result_row(image_uri, image_sha256, width, height, model_uri=model_uri, model_version=model_version,
                      error=error or "error", scored_at=scored_at)


def rows_to_table(rows: Sequence[dict]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=RESULT_SCHEMA)


def row_to_json(row: dict) -> dict:
    """A JSON-ready copy of a row (timestamps as ISO 8601), for serving."""
    out = dict(row)
    if isinstance(out.get("scored_at"), dt.datetime):
        out["scored_at"] = out["scored_at"].isoformat()
    json.dumps(out)  # fail here, not in the HTTP layer
    return out


def check_row(row: dict) -> list[str]:
    """Contract problems of one row (empty list: valid). Used by tests and serving's self-check."""
    problems = []
    missing = [f for f in RESULT_FIELDS if f not in row]
    if missing:
        return [f"missing fields {missing}"]
    if row["error"] is not None:
        return problems
    if not (1.0 - 1e-4 <= row["score"] <= 5.0 + 1e-4):
        problems.append(f"score {row['score']} outside 1..5")
    probs = row["level_probs"]
    if len(probs) != 5 or abs(sum(probs) - 1.0) > 1e-4 or min(probs) < 0:
        problems.append(f"level_probs {probs} are not 5 probabilities")
    w, h = row["width"], row["height"]
    for k, r in enumerate(row["regions"]):
        if r["point_x"] is not None and not (0 <= r["point_x"] <= w - 1 and 0 <= r["point_y"] <= h - 1):
            problems.append(f"regions[{k}] point ({r['point_x']}, {r['point_y']}) outside {w}x{h}")
        for key in ("p_right", "p_bottom"):
            if r[key] is not None and not 0.0 <= r[key] <= 1.0:  # NaN fails the comparison too
                problems.append(f"regions[{k}].{key} = {r[key]}")
        if r["mask_rle"] is not None and list(r["mask_rle"]["size"]) != [h, w]:
            problems.append(f"regions[{k}] mask size {r['mask_rle']['size']} is not [{h}, {w}]")
    return problems


__all__ = ["RESULT_SCHEMA", "REGION_RESULT", "RESULT_FIELDS", "result_row", "analysis_row", "error_row", "region_entries",
           "rows_to_table", "row_to_json", "check_row"]
