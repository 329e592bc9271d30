"""A table of images with known distortions -> samples of every task (`iqa-spider data import labelled`).

For a user who already has distorted images and knows what is wrong where, but did not make
them with our pipeline. One row per distortion::

    image      the image, relative to --images (or a URI)
    family     one of our families (vocab.DISTORTION_FAMILIES); empty or `none`: a clean image
    severity   1..5 (mild .. extreme)
    subtype    optional: the table's own name for the distortion, kept in the target
    mask       optional: a mask image (nonzero = the region), a path below --images, the image's size
    rle        optional: the region as COCO RLE JSON, {"size": [h, w], "counts": "..."}
    bbox       optional: the region as "x0 y0 x1 y1", in 0..1, or in pixels if any value is > 1
    label      optional: what the region shows ("sky"), used to name it
    source     optional: the pristine source; an image's versions share a split

No mask, RLE or bbox: the distortion covers the whole image. Rows of one image with the same
region form one region, their distortions a chain in row order. Each image becomes a `Truth`,
and the annotation pipeline's own writers and rules make its samples: the quality score and
level (docs/annotation.md, "Quality rule"), the position words (the cell holding most of a
region), and the questions and answers of the four tasks and rating.

An image is imported whole or skipped whole, counted under the reason: a wrong row would make
its answers wrong (a missing region is called clean). Reasons: the image's (`unreadable`,
`corrupt`, ...), `unknown_family`, `bad_severity`, `bad_region` (a mask that is unreadable, of
another size or empty; a bbox that is not four numbers in order; RLE that does not decode).
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict

import numpy as np

from iqa_spider import storage
from iqa_spider.annotate.importers.ratings import output_paths, resolve
from iqa_spider.annotate.importers.tables import cell_text, pick_column, read_rows
from iqa_spider.annotate.truth import Region, Truth
from iqa_spider.annotate.writers import sample_rows, write_all
from iqa_spider.data import rle
from iqa_spider.data.io import write_shard
from iqa_spider.data.schema import image_id, split_for
from iqa_spider.images import ImageError, decode_image
from iqa_spider.vocab import DISTORTION_FAMILIES

log = logging.getLogger(__name__)
TEXT_COLUMNS = ("image", "family", "subtype", "mask", "rle", "bbox", "label", "source")
CLEAN = ("", "none", "clean")


class RowError(ValueError):
    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


class LabelledDistortion:
    """A distortion the table says is there, not one we applied: the writers and the target
    need only its family, severity and (the table's) sub-type name."""

    __slots__ = ("severity", "subtype", "type")

    def __init__(self, family: str, subtype: str | None, severity: int):
        self.type, self.subtype, self.severity = family, subtype, severity


def _distortion(row: dict) -> LabelledDistortion | None:
    family = cell_text(row.get("family")).lower()
    if family in CLEAN:
        return None
    if family not in DISTORTION_FAMILIES:
        raise RowError("unknown_family", f"family {family!r} is not one of {', '.join(DISTORTION_FAMILIES)}")
    try:
        severity = float(row.get("severity"))
    except (TypeError, ValueError):
        severity = float("nan")
    if not (severity.is_integer() and 1 <= severity <= 5):
        raise RowError("bad_severity", f"severity must be a whole number 1..5, got {row.get('severity')!r}")
    return LabelledDistortion(family, cell_text(row.get("subtype")) or None, int(severity))


def _region_key(row: dict) -> tuple[str, str]:
    for kind in ("mask", "rle", "bbox"):
        if cell_text(row.get(kind)):
            return kind, cell_text(row.get(kind))
    return "whole", ""


def _region_mask(kind: str, value: str, width: int, height: int, images_uri: str) -> np.ndarray:
    if kind == "whole":
        return np.ones((height, width), bool)
    try:
        if kind == "mask":
            mask = _mask_image(value, images_uri)
        elif kind == "rle":
            mask = rle.decode(json.loads(value))
        else:
            mask = _bbox_mask(value, width, height)
    except RowError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RowError("bad_region", f"{kind} {value!r}: {exc}") from None
    if mask.shape != (height, width):
        raise RowError("bad_region", f"{kind} is {mask.shape[1]}x{mask.shape[0]}, the image {width}x{height}")
    if not mask.any():
        raise RowError("bad_region", f"{kind} {value!r} covers no pixel")
    return mask


def _mask_image(value: str, images_uri: str) -> np.ndarray:
    """A mask file below --images (nonzero = the region), decoded within the image limits."""
    if "://" in value or value.startswith(("/", "\\")) or ".." in value.replace("\\", "/").split("/"):
        raise RowError("bad_region", f"mask {value!r} must be a path below --images, without '..'")
    return np.asarray(decode_image(storage.read_bytes(storage.join(images_uri, value)))).max(axis=2) > 0


def _bbox_mask(value: str, width: int, height: int) -> np.ndarray:
    try:
        x0, y0, x1, y1 = (float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise RowError("bad_region", f"bbox {value!r} is not four numbers x0 y0 x1 y1") from None
    if max(x0, y0, x1, y1) <= 1.0:  # normalised
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    c0, c1 = max(0, round(x0)), min(width, round(x1))
    r0, r1 = max(0, round(y0)), min(height, round(y1))
    if not (c0 < c1 and r0 < r1):
        raise RowError("bad_region", f"bbox {value!r} needs x0 < x1 and y0 < y1 inside the image")
    mask = np.zeros((height, width), bool)
    mask[r0:r1, c0:c1] = True
    return mask


def truth_of(rows: list[dict], width: int, height: int, images_uri: str) -> Truth:
    """The image's truth from its rows: one region per distinct mask / RLE / bbox (or the whole
    image), its distortions in row order; a clean row adds nothing."""
    chains: dict[tuple[str, str], list[LabelledDistortion]] = {}
    labels: dict[tuple[str, str], str | None] = {}
    for row in rows:
        d = _distortion(row)
        if d is None:
            continue
        key = _region_key(row)
        chains.setdefault(key, []).append(d)
        labels.setdefault(key, cell_text(row.get("label")) or None)
    regions = [Region("whole" if kind == "whole" else f"r{k}", _region_mask(kind, value, width, height, images_uri),
                      labels[(kind, value)], distortions=list(chain))
               for k, ((kind, value), chain) in enumerate(chains.items())]
    return Truth(regions, width, height)


def import_labelled(table_uri: str, images_uri: str, output_uri: str, test_fraction: float = 0.1,
                    local_per_image: int = 2, referring_per_image: int = 2) -> dict:
    """Write every image of the table as samples of all tasks; returns the import's record."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in 0..1, got {test_fraction}")
    columns, table = read_rows(table_uri, text_columns=TEXT_COLUMNS)
    img_col = pick_column(table_uri, columns, ("image", "image_uri", "filename", "path"), "image")
    pick_column(table_uri, columns, ("family",), "family")
    by_image: dict[str, list[dict]] = defaultdict(list)
    skipped: Counter = Counter()
    for row in table:
        name = cell_text(row[img_col])
        if name:
            by_image[name].append(row)
        else:
            skipped["no_image"] += 1

    unique: dict[str, dict] = {}  # sample_id -> row
    listed, splits = 0, Counter()
    for done, (name, rows) in enumerate(by_image.items(), 1):
        if done % 500 == 0:
            log.info("labelled: %d/%d images", done, len(by_image))
        uri = resolve(name, images_uri)
        try:
            data = storage.read_with_retry(uri)  # S3's throttling and dropped connections are retried
            img = decode_image(data)
            truth = truth_of(rows, img.width, img.height, images_uri)
        except (ImageError, RowError) as exc:
            skipped[exc.reason] += 1
            log.warning("skipped %s: %s", uri, exc)
            continue
        except (OSError, *storage.transient_errors()) as exc:
            skipped["unreadable"] += 1
            log.warning("skipped %s: unreadable (%s: %s)", uri, type(exc).__name__, exc)
            continue
        iid = image_id(data)
        source = cell_text(rows[0].get("source"))
        split = split_for(f"labelled/{source}" if source else iid, test_fraction)
        # One generator per image, seeded by its bytes: the same table gives the same samples.
        rng = np.random.default_rng(int(iid[:16], 16))
        samples = write_all(rng, truth, local_per_image, referring_per_image)
        rows_out = sample_rows(iid, truth, samples, image=None, image_uri=uri, source_uri=uri, split=split)
        listed += len(rows_out)
        # Two regions named alike with the same distortions ask and answer the same: one sample.
        for row in rows_out:
            unique.setdefault(row["sample_id"], row)
        splits[split] += 1

    out_rows = list(unique.values())
    tasks = Counter(r["task"] for r in out_rows)
    shard, record_uri = output_paths(output_uri, "labelled")  # record: labelled.import.json
    write_shard(out_rows, shard)
    record = {"dataset": "labelled", "table": table_uri, "images": images_uri, "rows": len(table),
              "images_listed": len(by_image), "imported": sum(splits.values()), "skipped": dict(skipped),
              "samples": len(out_rows), "duplicates_dropped": listed - len(out_rows), "tasks": dict(sorted(tasks.items())),
              "split": {"mode": "source", "test_fraction": test_fraction,
                        **{side: {"samples": sum(r["split"] == side for r in out_rows), "images": splits[side]}
                           for side in ("train", "test")}},
              "output": shard, "record": record_uri}
    storage.write_bytes(record_uri, (json.dumps(record, indent=2) + "\n").encode())
    log.info("labelled import: %d of %d images, %d samples, skipped %s", record["imported"], len(by_image),
             len(out_rows), dict(skipped) or "none")
    return record
