"""Parquet shards on any URI (local, file://, s3://), written atomically.

A dataset is a folder of `*.parquet` shards (or one file). Readers get one pyarrow Table
in the contract's schema; writers validate first, so a bad row is refused before it can
reach a training job.
"""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from iqa_spider import storage
from iqa_spider.data.schema import DATASET_SCHEMA, check

# Jobs that write shards (annotation, scoring) keep each shard's summary in its Parquet
# metadata: a re-run reads footers only to know what is done and to total the run.
SUMMARY_KEY = b"iqa_spider.shard_summary"


def write_table(table: pa.Table, uri: str, *, compression: str = "zstd", summary: dict | None = None) -> None:
    """Write one Parquet file atomically (no schema check: results use this too), with the
    shard's `summary` in its metadata when given."""
    if summary is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               SUMMARY_KEY: json.dumps(summary).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    storage.write_bytes(uri, buf.getvalue())


def write_shard(rows: list[dict] | pa.Table, uri: str) -> pa.Table:
    """Validate rows against the dataset contract and write them as one shard."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)
    table = table.cast(DATASET_SCHEMA) if not table.schema.equals(DATASET_SCHEMA) else table
    check(table)
    write_table(table, uri)
    return table


def shard_uris(uri: str) -> list[str]:
    """The Parquet files of a dataset: `uri` itself if it is a file, else every *.parquet below it."""
    return list(storage.iter_files(uri, suffixes=(".parquet",)))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one file or a folder of shards into one Table."""
    uris = shard_uris(uri)
    if not uris:
        raise FileNotFoundError(f"no .parquet files at {uri}")
    tables = []
    for u in uris:
        fs, path = storage.get_fs(u)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def read_dataset(uri: str, *, validate: bool = True) -> pa.Table:
    """Read a dataset in the contract's schema (cast, then validated unless told not to)."""
    table = read_table(uri).cast(DATASET_SCHEMA)
    if validate:
        check(table)
    return table


def shard_name(index: int, prefix: str = "part") -> str:
    return f"{prefix}-{index:05d}.parquet"


__all__ = ["write_table", "write_shard", "shard_uris", "read_table", "read_dataset", "shard_name"]


def read_shard_summary(uri: str) -> dict | None:
    """The summary a job kept in a shard's metadata (footer only); None if absent or unreadable."""
    fs, path = storage.get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
    except (FileNotFoundError, OSError, pa.ArrowInvalid):
        return None
    return json.loads(meta[SUMMARY_KEY]) if SUMMARY_KEY in meta else None
