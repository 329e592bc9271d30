"""Which keys are inputs, which are already in the output, and the input blocks.

- An input is a file below ``input.uri`` (recursive, streamed one folder listing at a time)
  with an image suffix (``images.IMAGE_SUFFIXES``, any case), or, without one, whose first
  bytes are those of an image (``images.looks_like_image``). A file with an image suffix
  that is not an image is still an input: it gets a row with ``error`` not_an_image.
- The output index: the ``image_uri`` of every row of ``OUTPUT/data/*.parquet``. A key that
  has a row (scored, or with an ``error``) is done and skipped by a re-run, unless
  ``input.retry_errors`` names its error's reason (``release_errors``).
- Pending keys are cut into blocks of ``output.block_size``; a block's shard name is a hash
  of its keys, so a retried block overwrites its own shard and never adds a second one.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from iqa_spider import storage
from iqa_spider.data.io import read_shard_summary, read_table, shard_uris, write_table
from iqa_spider.images import IMAGE_SUFFIXES, looks_like_image
from iqa_spider.score.report import reason

log = logging.getLogger(__name__)

# Suffixes that are never images: not even sniffed.
NOT_IMAGES = (".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".parquet", ".yaml", ".yml", ".xml", ".html",
              ".zip", ".tar", ".gz", ".pdf", ".log", ".py")
INDEX_COLUMNS = ["image_uri", "error", "score"]


@dataclass
class Listing:
    ignored: int = 0                # files that are not images (by name and by content)
    sniffed: int = 0                # files without an image suffix whose bytes were checked
    seconds: float = 0.0


def iter_inputs(input_uri: str, output_uri: str, sniff_unknown: bool, stats: Listing) -> Iterator[str]:
    """Input keys in listing order (sorted per folder), streamed."""
    started = time.monotonic()
    for uri in storage.iter_files(input_uri):
        if storage.is_below(uri, output_uri):
            continue  # our own output inside the input folder is not input
        name = posixpath.basename(uri).lower()
        if name.endswith(IMAGE_SUFFIXES):
            yield uri
        elif sniff_unknown and not name.endswith(NOT_IMAGES) and _sniff(uri):
            stats.sniffed += 1
            yield uri
        else:
            stats.ignored += 1
            log.info("not an image, ignored: %s", uri)
    stats.seconds = time.monotonic() - started


def _sniff(uri: str) -> bool:
    try:
        with storage.open_read(uri) as f:
            return looks_like_image(f.read(16))
    except OSError:
        return True  # unreadable: let it be an input, so its row says why


@dataclass
class OutputIndex:
    keys: dict[str, str | None] = field(default_factory=dict)  # key -> error (None: scored)
    scores: list[float] = field(default_factory=list)


def shard_dir(output_uri: str) -> str:
    return storage.join(output_uri, "data")


def load_index(output_uri: str) -> OutputIndex:
    """Every key already written under ``output_uri``; a key found twice is reported (it
    would mean two jobs wrote one output at once)."""
    idx = OutputIndex()
    base = shard_dir(output_uri)
    fs, path = storage.get_fs(base)
    fs.invalidate_cache(path)  # shards are written by workers: this process's listing cache is stale
    if not fs.exists(path) or not shard_uris(base):
        return idx
    t = read_table(base, columns=INDEX_COLUMNS)
    for key, err, score in zip(*(t.column(c).to_pylist() for c in INDEX_COLUMNS)):
        if key in idx.keys:
            log.error("key %s is in more than one shard (concurrent jobs on one output?)", key)
        idx.keys[key] = err
        if score is not None:
            idx.scores.append(score)
    return idx


def release_errors(output_uri: str, reasons: Iterable[str]) -> int:
    """Take the rows whose error reason is in `reasons` out of their shards, so that this run
    scores their keys again (`input.retry_errors`, e.g. after an S3 outage); returns how many.

    Runs before anything is scored. Each shard is rewritten atomically, or deleted when no row
    is left: a crash in between leaves those keys absent from the output, and absent keys are
    what a run scores. Nothing is lost and no key ends up in two shards.
    """

    wanted = set(reasons)
    base = shard_dir(output_uri)
    if not wanted or not storage.exists(base):
        return 0
    released = 0
    for uri in shard_uris(base):
        # The error column alone decides; only a shard that has such rows is read whole.
        errors = read_table(uri, columns=["error"]).column("error").to_pylist()
        keep = [e is None or reason(e) not in wanted for e in errors]
        if all(keep):
            continue
        gone = [reason(e) for e, k in zip(errors, keep) if not k]
        if not any(keep):
            storage.remove(uri)
        else:
            summary = read_shard_summary(uri) or {}
            if summary:
                left = {r: n - gone.count(r) for r, n in summary.get("errors", {}).items()}
                summary.update(keys=sum(keep), errors={r: n for r, n in left.items() if n > 0},
                               released=summary.get("released", 0) + len(gone))
            write_table(read_table(uri).filter(keep), uri, summary=summary or None)
        released += len(gone)
        log.info("%s: %d rows with errors %s taken out to score again", uri, len(gone), sorted(set(gone)))
    return released


def block_name(keys: list[str]) -> str:
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


def plan_blocks(keys: Iterable[str], done: dict, block_size: int, output_uri: str) -> tuple[list[dict], int]:
    """(blocks of pending keys, number of keys skipped because they are already done)."""
    blocks, current, skipped = [], [], 0
    base = shard_dir(output_uri)

    def close() -> None:
        name = block_name(current)
        blocks.append({"name": name, "uri": storage.join(base, name), "keys": list(current)})
        current.clear()

    for key in keys:
        if key in done:
            skipped += 1
            continue
        current.append(key)
        if len(current) >= block_size:
            close()
    if current:
        close()
    return blocks, skipped


__all__ = ["iter_inputs", "load_index", "plan_blocks", "release_errors", "block_name", "Listing",
           "OutputIndex", "shard_dir"]
