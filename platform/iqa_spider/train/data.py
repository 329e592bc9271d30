"""The training stream: contract Parquet -> task mix -> preprocessed rows, all in Ray Data.

Checked on the driver before any worker starts (`check_dataset`): the URI has shards, they
carry the contract's columns, and the split has rows of the weighted tasks. Mixing
resamples each task to its configured share: a row of task t is emitted floor(f_t) or
ceil(f_t) times with f_t = share_t * N / n_t, decided by a hash of its sample_id, so the
mix is the same on every run and needs no global shuffle.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from iqa_spider import storage
from iqa_spider.config.schemas import TrainConfig
from iqa_spider.data.io import shard_uris
from iqa_spider.data.schema import DATASET_SCHEMA
from iqa_spider.train.preprocess import Preprocessor

TRAIN_COLUMNS = ("sample_id", "image", "image_uri", "task", "question", "answer", "split")


class DataError(ValueError):
    """The training data cannot be used; raised before any worker starts."""


def check_dataset(cfg: TrainConfig) -> dict[str, int]:
    """Validate the data URI cheaply (footers + two columns); return rows per task in the split."""
    uris = shard_uris(cfg.data.uri) if storage.exists(cfg.data.uri) else []
    if not uris:
        raise DataError(f"data.uri {cfg.data.uri}: no Parquet shards found")
    expected = {f.name: f.type for f in DATASET_SCHEMA}
    counts: Counter = Counter()
    for uri in uris:
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            for col in TRAIN_COLUMNS:
                if col not in schema.names:
                    raise DataError(f"data.uri {uri}: column '{col}' missing; not the dataset contract "
                                    f"(columns: {schema.names})")
                if not schema.field(col).type.equals(expected[col]):
                    raise DataError(f"data.uri {uri}: column '{col}' has type {schema.field(col).type}, "
                                    f"the contract says {expected[col]}")
            t = pf.read(columns=["task", "split"])
        for task, split in zip(t.column("task").to_pylist(), t.column("split").to_pylist()):
            if split == cfg.data.split:
                counts[task] += 1
    weighted = {t for t, w in cfg.data.task_weights.items() if w > 0}
    if not any(counts[t] for t in weighted):
        raise DataError(f"data.uri {cfg.data.uri}: no '{cfg.data.split}' rows of the weighted tasks "
                        f"{sorted(weighted)} (found {dict(counts)})")
    return dict(counts)


def repeat_factors(counts: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """How many times, on average, each row of a task is emitted to reach the weighted shares."""
    present = {t: w for t, w in weights.items() if w > 0 and counts.get(t)}
    total_rows = sum(counts[t] for t in present)
    total_w = sum(present.values())
    return {t: (w / total_w) * total_rows / counts[t] for t, w in present.items()}


def _unit(sample_id: str) -> float:
    return int(hashlib.sha256(sample_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _mix(batch: dict[str, np.ndarray], factors: dict[str, float]) -> dict[str, np.ndarray]:
    keep: list[int] = []
    for i, (sid, task) in enumerate(zip(batch["sample_id"], batch["task"])):
        f = factors.get(str(task), 0.0)
        copies = math.floor(f) + (1 if _unit(str(sid)) < f - math.floor(f) else 0)
        keep.extend([i] * copies)
    idx = np.asarray(keep, dtype=np.int64)
    return {k: v[idx] for k, v in batch.items()}


def read_split(cfg: TrainConfig):
    """The contract rows of `cfg.data.split`, only the columns training reads (lazy)."""
    import ray
    from ray.data.expressions import col

    fs, path = storage.arrow_filesystem(cfg.data.uri)
    # Reads get the same small CPU share as preprocessing: training workers hold most CPUs,
    # and a read task asking for a whole core would wait for ever on a small node.
    ds = ray.data.read_parquet(path, filesystem=fs, file_extensions=["parquet"], num_cpus=cfg.scaling.preprocess_cpus)
    # Both are pushed down into the Parquet read by Ray Data's optimizer; as an expression, the
    # split name is a value, not text spliced into a string (a quote in it cannot break it).
    return ds.select_columns(list(TRAIN_COLUMNS)).filter(expr=col("split") == cfg.data.split)


def build_dataset(cfg: TrainConfig, counts: dict[str, int]):
    """The lazy Ray Dataset the trainer shards across workers."""
    import ray

    # Step logs show training progress; Data's bars would only flood the job log from the
    # split coordinator.
    ray.data.DataContext.get_current().enable_progress_bars = False
    factors = repeat_factors(counts, cfg.data.task_weights)
    ds = read_split(cfg).map_batches(_mix, fn_kwargs={"factors": factors}, batch_format="numpy",
                                     num_cpus=cfg.scaling.preprocess_cpus)
    ds = ds.map_batches(
        Preprocessor, batch_size=16, batch_format="numpy", num_cpus=cfg.scaling.preprocess_cpus,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.scaling.preprocess_actors),
        fn_constructor_kwargs={"model_path": cfg.model.path, "max_seq_len": cfg.data.max_seq_len,
                               "max_pixels": cfg.data.max_pixels, "min_image_pixels": cfg.model.min_pixels,
                               "max_image_pixels": cfg.model.max_pixels})
    return ds
