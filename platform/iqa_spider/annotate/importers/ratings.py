"""Rated images -> `rating` samples of the dataset contract: the writer every MOS importer shares.

An importer (one module per published layout) only parses its set into `RatedImage`s; this
module reads and checks each image, maps the set's opinion scale onto the contract's 1..5
`quality_score` (`Scale`), picks the split, writes one validated shard and, beside it, the
import's record (`<set>.import.json`: the scale and its mapping, the split rule, counts per
split), so imports of several sets into one folder keep theirs.

Every listed image is either imported or counted under a skip reason, never fatal: the image is
missing or unreadable (`unreadable`), is not a usable image (the reasons of
`images.decode_image`: `empty`, `not_an_image`, `corrupt`, `too_many_pixels`), has no numeric
MOS (`no_mos`), repeats an image already imported (`duplicate`: the same URI, or the same bytes
with the same level, which would give a duplicate sample_id), or has no name (`no_image`).
A MOS outside the scale is clamped to it, and counted (`clamped`); more than 1% outside it is
an error, since the scale is then wrong, not the data.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from iqa_spider import storage
from iqa_spider.annotate.truth import level_for_score
from iqa_spider.data.io import write_shard
from iqa_spider.data.schema import OTHER_DISTORTION, SCHEMA_VERSION, image_id, sample_id, split_for
from iqa_spider.images import ImageError, decode_image
from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

log = logging.getLogger(__name__)

# How the split is chosen: `source` hashes the reference (or, for an authentic image, its own
# bytes), so every version of one content lands on one side; `official` keeps the set's own
# split; `test` puts the whole set in the test split, the anchors' cross-set protocol (train on
# one set, test on all of another); `auto` is `official` where the set gives one, else `source`.
SPLIT_MODES = ("auto", "source", "official", "test")
PROGRESS_EVERY = 500
READ_THREADS = 8  # reads are I/O-bound (S3 above all): a few in flight hide the latency
MAX_CLAMPED_SHARE = 0.01


@dataclass(frozen=True)
class Scale:
    """A set's opinion scale [low, high], and its linear map onto the contract's 1..5."""

    low: float
    high: float
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ValueError(f"the scale's high ({self.high}) must be greater than its low ({self.low})")

    def clamps(self, mos: float) -> bool:
        return not self.low <= mos <= self.high

    def to_score(self, mos: float) -> float:
        """1..5, linear in the MOS (clamped to the scale); a lower-is-better scale is inverted.
        SRCC and the logistic-fitted PLCC are unchanged by a linear map of the truth, so scores
        against it compare with figures published against the raw MOS."""
        frac = (min(max(mos, self.low), self.high) - self.low) / (self.high - self.low)
        return round(1.0 + 4.0 * (frac if self.higher_is_better else 1.0 - frac), 4)

    def record(self) -> dict:
        span = self.high - self.low
        formula = (f"1 + 4 * (mos - {self.low:g}) / {span:g}" if self.higher_is_better
                   else f"5 - 4 * (mos - {self.low:g}) / {span:g}")
        return {"low": self.low, "high": self.high, "higher_is_better": self.higher_is_better,
                "quality_score": formula}


@dataclass(frozen=True)
class RatedImage:
    """One image of a set as the set lists it."""

    name: str | None                 # relative to the images folder, or a URI / absolute path
    mos: float | None
    reference: str | None = None     # the pristine source: its versions share a split
    distortion: dict | None = None   # {type, subtype, severity}: a synthetic set's known distortion
    split: str | None = None         # the set's own split, where it has one


def parse_synthetic_name(name: str, pattern: re.Pattern, types: tuple[tuple[str, str | None], ...],
                         dataset: str) -> tuple[str, dict] | None:
    """A synthetic set's file name -> (its reference, its distortion), where `pattern` has the
    groups ref, type (1-based into `types`: (the set's name, our family or None)) and level;
    None if the name is not in the set's scheme."""
    m = pattern.match(name.rsplit("/", 1)[-1])
    if not m or not 1 <= int(m["type"]) <= len(types) or not 1 <= int(m["level"]) <= 5:
        return None
    label, family = types[int(m["type"]) - 1]
    # our family where one is the same distortion, else `other`; the set's own name kept as the
    # subtype, its level (1..5, mild to extreme) as the severity
    return m["ref"].upper(), {"type": family or OTHER_DISTORTION, "subtype": f"{dataset}:{label}",
                              "severity": int(m["level"])}


def as_float(value) -> float | None:
    """A table cell as a finite number, or None."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def resolve(name: str, images_uri: str) -> str:
    """An image name -> URI: URIs and absolute paths as they are, others under images_uri."""
    uri = name if "://" in name or name.startswith("/") else storage.join(images_uri, name)
    return uri if "://" in uri else os.path.abspath(uri)


def _check(uri: str) -> tuple[str, int, int] | str:
    """(content hash, width, height) of a usable image, or the skip reason. Only these travel
    back from the reading threads: the bytes and pixels of a 12 MP photo stay in the thread."""
    try:
        data = storage.read_with_retry(uri)  # S3's throttling and dropped connections are retried
        img = decode_image(data)
        return image_id(data), img.width, img.height
    except ImageError as exc:
        log.warning("skipped %s: %s", uri, exc)
        return exc.reason
    except (OSError, *storage.transient_errors()) as exc:
        log.warning("skipped %s: unreadable (%s: %s)", uri, type(exc).__name__, exc)
        return "unreadable"


def _checked_in_order(uris: list[str]) -> Iterator[tuple[str, int, int] | str]:
    """`_check` of each URI, in order, with at most 2 x READ_THREADS in flight: Executor.map
    would submit them all at once and hold every finished result until its turn."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        pending: deque = deque()
        for uri in uris:
            pending.append(pool.submit(_check, uri))
            if len(pending) >= 2 * READ_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _split(item: RatedImage, iid: str, mode: str, dataset: str, test_fraction: float) -> str:
    if mode == "test":
        return "test"
    if mode == "official":
        return item.split
    key = f"{dataset}/{item.reference}" if item.reference else iid
    return split_for(key, test_fraction)


def rating_row(item: RatedImage, uri: str, iid: str, width: int, height: int, score: float, split: str) -> dict:
    level = level_for_score(score)
    answer = f"{SCORE_ANSWER_PREFIX} {level}."
    regions = []
    if item.distortion:  # a synthetic set's distortion covers the whole image
        regions = [{"region_id": "whole", "mask_rle": None, "bbox": [0.0, 0.0, 1.0, 1.0], "position": [],
                    "label": None, "distortions": [item.distortion]}]
    return {
        "sample_id": sample_id(iid, "rating", SCORE_QUESTION, answer), "image_id": iid, "image": None,
        "image_uri": uri, "width": width, "height": height, "task": "rating", "subtask": None,
        "question": SCORE_QUESTION, "answer": answer,
        "target": {"regions": regions, "target_region_ids": [], "whole_image": True,
                   "quality_level": level, "quality_score": score},
        "source_uri": uri, "split": split, "schema_version": SCHEMA_VERSION,
    }


def output_paths(output_uri: str, dataset: str) -> tuple[str, str]:
    """(shard, record) URIs: `output_uri` as the shard if it names a .parquet file (the record
    beside it), else both inside the folder."""
    if output_uri.endswith(".parquet"):
        return output_uri, output_uri[: -len(".parquet")] + ".import.json"
    return storage.join(output_uri, f"{dataset}-00000.parquet"), storage.join(output_uri, f"{dataset}.import.json")


def check_scale(scale: Scale, given: list[float], dataset: str) -> None:
    """Refuse a scale that more than 1% of the MOS fall outside, and warn of one they use under a
    tenth of: either way the scale is wrong for the table, not the data for the scale."""
    outside = [m for m in given if scale.clamps(m)]
    if len(outside) > MAX_CLAMPED_SHARE * max(1, len(given)):
        raise ValueError(f"{dataset}: {len(outside)} MOS values lie outside the scale [{scale.low:g}, {scale.high:g}] "
                         f"(e.g. {max(outside, key=abs):g}): the scale is wrong for this table")
    if len(given) >= 20 and max(given) - min(given) < 0.1 * (scale.high - scale.low):
        log.warning("%s: every MOS lies within %g..%g, under a tenth of the scale [%g, %g]: is the scale right?",
                    dataset, min(given), max(given), scale.low, scale.high)


def import_ratings(items: Iterable[RatedImage], *, dataset: str, images_uri: str, output_uri: str,
                   scale: Scale, split: str = "auto", test_fraction: float = 0.1,
                   resolver: Callable[[str], str] | None = None, source: dict | None = None) -> dict:
    """Write `items` as rating samples to `output_uri`; returns the import's record (also written
    as <dataset>.import.json): `rows`, `imported`, `skipped` ({reason: count}), `splits`, `scale`, `output`."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_MODES)}, got {split!r}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in 0..1, got {test_fraction}")
    items = list(items)
    check_scale(scale, [i.mos for i in items if i.mos is not None], dataset)
    has_official = bool(items) and all(i.split in ("train", "test") for i in items)
    if split == "official" and not has_official:
        raise ValueError(f"{dataset}: split=official, but the set gives no train/test split for every image")
    mode = ("official" if has_official else "source") if split == "auto" else split
    if split == "auto" and not has_official and any(i.split for i in items):
        log.warning("%s: only some images have an official split; splitting all by source instead", dataset)
    resolver = resolver or (lambda name: resolve(name, images_uri))

    skipped: Counter = Counter()
    todo: list[tuple[RatedImage, str]] = []
    seen_uris: set[str] = set()
    for item in items:
        if not item.name:
            skipped["no_image"] += 1
            continue
        uri = resolver(item.name)
        if item.mos is None:
            skipped["no_mos"] += 1
            log.warning("skipped %s: no numeric MOS", uri)
        elif uri in seen_uris:
            skipped["duplicate"] += 1
            log.warning("skipped %s: listed more than once", uri)
        else:
            seen_uris.add(uri)
            todo.append((item, uri))

    rows, seen_samples, clamped = [], set(), 0
    sources: dict[str, set[str]] = {"train": set(), "test": set()}  # references (or images) per split
    for done, ((item, uri), got) in enumerate(zip(todo, _checked_in_order([uri for _, uri in todo])), 1):
        if done % PROGRESS_EVERY == 0:
            log.info("%s: read %d/%d images", dataset, done, len(todo))
        if isinstance(got, str):
            skipped[got] += 1
            continue
        iid, width, height = got
        row = rating_row(item, uri, iid, width, height, scale.to_score(item.mos),
                         _split(item, iid, mode, dataset, test_fraction))
        if row["sample_id"] in seen_samples:
            skipped["duplicate"] += 1
            log.warning("skipped %s: the same image with the same level was already imported", uri)
            continue
        seen_samples.add(row["sample_id"])
        clamped += scale.clamps(item.mos)
        sources[row["split"]].add(item.reference or iid)
        rows.append(row)

    shard, record_uri = output_paths(output_uri, dataset)
    write_shard(rows, shard)
    by_split = Counter(r["split"] for r in rows)
    record = {
        "dataset": dataset, **(source or {}), "images": images_uri,
        "rows": len(items), "imported": len(rows), "skipped": dict(skipped), "clamped": clamped,
        "scale": scale.record(), "split": {"mode": mode, "test_fraction": test_fraction,
                  **{s: {"samples": by_split[s], "sources": len(sources[s])} for s in ("train", "test")}},
        "output": shard, "record": record_uri,
    }
    storage.write_bytes(record_uri, (json.dumps(record, indent=2) + "\n").encode())
    log.info("%s import: %d of %d imported, skipped %s, split %s", dataset, len(rows), len(items),
             dict(skipped) or "none", record["split"])
    return record
