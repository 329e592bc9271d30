"""The dataset contract (docs/architecture.md, docs/dataset.md) as a pyarrow schema, plus `validate()`.

One row per (image, task sample). Images are either embedded (`image` bytes) or referenced
(`image_uri`); `target` holds the machine-readable truth the answer was written from, so
evaluation never has to parse text to know what was right.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from iqa_spider.vocab import DISTORTION_FAMILIES, HORIZONTAL_3, LEVEL_WORDS, POSITION_WORDS, VERTICAL_3

SCHEMA_VERSION = 1
TASKS = ("global_desc", "local_desc", "grounding", "referring_short", "referring_long", "rating")
GROUNDING_SUBTASKS = ("hyd", "sid", "dao")
SPLITS = ("train", "test")
# A distortion none of our families names (a standard set's "color diffusion", say): its type
# is "other" and its subtype keeps the set's own name, so an import loses nothing. Only imported
# ratings carry it: the answer writers name families, so annotated samples never do.
OTHER_DISTORTION = "other"
DISTORTION_TYPES = (*DISTORTION_FAMILIES, OTHER_DISTORTION)

MASK_RLE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
DISTORTION = pa.struct([("type", pa.string()), ("subtype", pa.string()), ("severity", pa.int32())])
REGION = pa.struct([
    ("region_id", pa.string()),
    ("mask_rle", MASK_RLE),
    ("bbox", pa.list_(pa.float32())),          # x0, y0, x1, y1 in 0..1
    ("position", pa.list_(pa.string())),       # [vertical, horizontal] words, e.g. ["top", "left"]
    ("label", pa.string()),                    # semantic label, or null (named by position)
    ("distortions", pa.list_(DISTORTION)),     # in the order they were applied
])
TARGET = pa.struct([
    ("regions", pa.list_(REGION)),
    ("target_region_ids", pa.list_(pa.string())),
    ("whole_image", pa.bool_()),
    ("quality_level", pa.string()),
    ("quality_score", pa.float32()),
])

DATASET_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("image_uri", pa.string()),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("subtask", pa.string()),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("target", TARGET),
    pa.field("source_uri", pa.string()),
    pa.field("split", pa.string(), nullable=False),
    pa.field("schema_version", pa.int32(), nullable=False),
], metadata={b"iqa_spider.schema_version": str(SCHEMA_VERSION).encode()})


def image_id(image_bytes: bytes) -> str:
    """Content hash of the (distorted) image bytes."""
    return hashlib.sha256(image_bytes).hexdigest()


def sample_id(image_id_: str, task: str, question: str, answer: str) -> str:
    """Stable id of one sample: the same inputs give the same id on every run and machine."""
    h = hashlib.sha256("\x1f".join((image_id_, task, question, answer)).encode("utf-8"))
    return h.hexdigest()[:32]


def split_for(source_key: str, test_fraction: float) -> str:
    """train/test by a hash of the pristine source's key (its content hash, `image_id`), so no
    image leaks across splits, copies under other names included, wherever the collection lives."""
    bucket = int(hashlib.sha256(source_key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


@dataclass(frozen=True)
class Violation:
    row: int | None  # None: a whole-table problem (missing column, wrong type)
    column: str
    message: str

    def __str__(self) -> str:
        where = "table" if self.row is None else f"row {self.row}"
        return f"{where}, column {self.column}: {self.message}"


class DatasetError(ValueError):
    def __init__(self, violations: list[Violation]):
        self.violations = violations
        head = "; ".join(map(str, violations[:5]))
        more = f" (and {len(violations) - 5} more)" if len(violations) > 5 else ""
        super().__init__(f"{len(violations)} contract violation(s): {head}{more}")


def validate(table: pa.Table) -> list[Violation]:
    """Every violation of the contract in `table`, each with its row and column."""
    out: list[Violation] = []
    for f in DATASET_SCHEMA:
        if f.name not in table.column_names:
            out.append(Violation(None, f.name, "missing column"))
        elif not table.schema.field(f.name).type.equals(f.type):
            out.append(Violation(None, f.name, f"type {table.schema.field(f.name).type}, expected {f.type}"))
    if out:  # row checks would only repeat the same problem per row
        return out
    seen: dict[str, int] = {}
    for i, row in enumerate(table.to_pylist()):
        out.extend(Violation(i, col, msg) for col, msg in _row_problems(row))
        sid = row["sample_id"]
        if sid in seen:
            out.append(Violation(i, "sample_id", f"duplicate of row {seen[sid]}"))
        elif sid:
            seen[sid] = i
    return out


def check(table: pa.Table) -> None:
    """Raise DatasetError if `table` violates the contract."""
    violations = validate(table)
    if violations:
        raise DatasetError(violations)


def _row_problems(row: dict[str, Any]) -> Iterable[tuple[str, str]]:
    for col in ("sample_id", "image_id", "question", "answer"):
        if not row[col]:
            yield col, "must be a non-empty string"
    if (row["image"] is None) == (row["image_uri"] is None):
        yield "image", "exactly one of image / image_uri must be set"
    for col in ("width", "height"):
        if row[col] is None or row[col] <= 0:
            yield col, f"must be a positive pixel count, got {row[col]}"
    task, subtask = row["task"], row["subtask"]
    if task not in TASKS:
        yield "task", f"{task!r} is not one of {', '.join(TASKS)}"
    if task == "grounding" and subtask not in GROUNDING_SUBTASKS:
        yield "subtask", f"grounding needs one of {', '.join(GROUNDING_SUBTASKS)}, got {subtask!r}"
    if task != "grounding" and subtask is not None:
        yield "subtask", f"only grounding samples have a subtask, {task} has {subtask!r}"
    if row["split"] not in SPLITS:
        yield "split", f"{row['split']!r} is not train or test"
    if row["schema_version"] != SCHEMA_VERSION:
        yield "schema_version", f"{row['schema_version']} is not {SCHEMA_VERSION}"
    target = row["target"]
    if target is None:
        yield "target", "must be set (the truth the answer was written from)"
        return
    yield from _target_problems(target, task, row["width"], row["height"])


def _position_problem(position: list | None) -> str | None:
    """A region's `position` is [vertical, horizontal] (e.g. [top, left]) or empty: evaluation
    compares position[0] with the answer's vertical word, so [left, top] would score 0 silently."""
    words = list(position or [])
    bad = [w for w in words if w not in POSITION_WORDS]
    if bad:
        return f"{bad[0]!r} is not a position word"
    if not words:
        return None
    if len(words) == 2 and words[0] in HORIZONTAL_3 and words[1] in VERTICAL_3:
        return (f"{words} is horizontal first; write [vertical, horizontal]: "
                f"[{words[1]!r}, {words[0]!r}]")
    if len(words) != 2 or words[0] not in VERTICAL_3 or words[1] not in HORIZONTAL_3:
        return (f"{words} must be [vertical, horizontal]: one of {', '.join(VERTICAL_3)}, "
                f"then one of {', '.join(HORIZONTAL_3)}")
    return None


def _target_problems(target: dict, task: str, width: int, height: int) -> Iterable[tuple[str, str]]:
    regions = target["regions"] or []
    ids = set()
    for k, region in enumerate(regions):
        where = f"target.regions[{k}]"
        ids.add(region["region_id"])
        bbox = region["bbox"]
        if bbox is None or len(bbox) != 4 or not all(0.0 <= v <= 1.0 for v in bbox):
            yield f"{where}.bbox", f"must be 4 numbers in 0..1, got {bbox}"
        elif not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            yield f"{where}.bbox", f"needs x0 < x1 and y0 < y1, got {bbox}"
        rle = region["mask_rle"]
        if rle is not None and list(rle["size"] or []) != [height, width]:
            yield f"{where}.mask_rle", f"size {rle['size']} is not [height, width] = [{height}, {width}]"
        problem = _position_problem(region["position"])
        if problem:
            yield f"{where}.position", problem
        for d in region["distortions"] or []:
            if d["type"] not in DISTORTION_TYPES:
                yield f"{where}.distortions", f"unknown distortion type {d['type']!r}"
            elif d["type"] == OTHER_DISTORTION and not d["subtype"]:
                yield f"{where}.distortions", "an 'other' distortion needs its own name in subtype"
            if d["severity"] is None or not 1 <= d["severity"] <= 5:
                yield f"{where}.distortions", f"severity must be 1..5, got {d['severity']}"
    for rid in target["target_region_ids"] or []:
        if rid not in ids:
            yield "target.target_region_ids", f"{rid!r} names no region of this sample"
    if task == "grounding" and not target["whole_image"] and not target["target_region_ids"]:
        yield "target.target_region_ids", "a grounding sample needs target regions or whole_image"
    level, score = target["quality_level"], target["quality_score"]
    if level is not None and level not in LEVEL_WORDS:
        yield "target.quality_level", f"{level!r} is not one of {', '.join(LEVEL_WORDS)}"
    if score is not None and not 1.0 <= score <= 5.0:
        yield "target.quality_score", f"must be in 1..5, got {score}"
    if task == "rating" and score is None:
        yield "target.quality_score", "a rating sample needs a quality score"
