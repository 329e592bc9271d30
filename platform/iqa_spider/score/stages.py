"""The Ray Data stages of the scoring job. One Ray Data row is one input block (a list of
keys); what travels between stages is one pickled payload per block.

1. ``read_decode`` (CPU task): read every key (retries with backoff), hash, decode and
   validate (pixel limit, decompression bombs, odd modes -> 8-bit RGB, EXIF rotation).
   A bad input becomes an error entry here, never an exception.
2. ``Scorer`` (actor pool; a model per actor, ``num_gpus`` per actor) or ``ServeScorer``
   (actors holding handles of a running Serve app): result-contract rows, one per key.
3. ``write_block`` (CPU task): the block's Parquet shard under its deterministic name (with
   its summary in the file metadata), then the optional mask / overlay artifacts.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import pickle
import time

import numpy as np

from iqa_spider.data.io import write_table
from iqa_spider.images import ImageError, decode_image, deterministic, prepare_image
from iqa_spider.infer import results as R
from iqa_spider.score import report
from iqa_spider.storage import read_with_retry

log = logging.getLogger(__name__)
SERVE_ATTEMPTS = 3        # tries of one Serve call (backend serve) before the block fails
SERVE_RETRY_WAIT_S = 2.0  # times the attempt number: time for Serve to replace a replica


def pack_block(block: dict) -> dict:
    """The Ray Data row that carries one block between the stages.

    Why one pickled payload and not typed columns: the unit the job must keep whole is the
    block, not the image. Its keys, decoded images of any size, error entries, rows, timings
    and retry counts go from read to score to write together, so that each output shard is
    written once with exactly its keys. As typed columns that would be a nested list of
    structs with variable-shaped tensors, rebuilt in every stage, for rows that nothing
    outside this module ever reads.
    """
    return {"payload": pickle.dumps(block, protocol=5)}


def unpack_block(row: dict) -> dict:
    return pickle.loads(row["payload"])


def _apply_env(env: dict | None) -> None:
    # Workers of a cluster do not inherit the driver's environment: the driver passes the
    # variables the stages need (S3 endpoint and keys, MLflow) explicitly.
    if env:
        os.environ.update(env)


# ---------------------------------------------------------------- 1. read + decode

def task_attempt() -> int:
    """How often Ray has retried the running task (0: its first try), so that the job can say
    a worker died under it. Ray 2.60's public runtime context has no such call; the core
    worker's is the one Ray's own task events use."""
    try:
        from ray._private.worker import global_worker

        return int(global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # noqa: BLE001 - outside a Ray task, or an API that moved: "not retried"
        return 0


def read_decode(row: dict, *, max_pixels: int, attempts: int, backoff_s: float, env: dict | None = None,
                crash_marker: str | None = None) -> dict:
    _apply_env(env)
    _maybe_crash(f"{crash_marker}.read" if crash_marker else None, "read task")
    block = unpack_block(row)
    block["read_attempt"] = task_attempt()
    items, t_read, t_decode = [], 0.0, 0.0
    for key in block["keys"]:
        item = {"key": key, "sha": hashlib.sha256(b"").hexdigest(), "error": None, "image": None,
                "width": None, "height": None}
        t0 = time.perf_counter()
        try:
            data = read_with_retry(key, attempts, backoff_s)
        except Exception as exc:  # noqa: BLE001 - missing, denied, S3 errors left after every retry
            item["error"] = deterministic(f"unreadable: {type(exc).__name__}: {exc}")[:500]
            items.append(item)
            t_read += time.perf_counter() - t0
            continue
        t1 = time.perf_counter()
        t_read += t1 - t0
        item["sha"] = hashlib.sha256(data).hexdigest()
        try:
            img = prepare_image(decode_image(data, max_pixels))
            item["image"] = np.asarray(img)
            item["height"], item["width"] = item["image"].shape[:2]
        except ImageError as exc:
            item["error"] = str(exc)[:500]
            if exc.size:  # read from the header: a refused image still says how big it was
                item["width"], item["height"] = exc.size
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop a million-image job
            item["error"] = deterministic(f"corrupt: {type(exc).__name__}: {exc}")[:500]
        t_decode += time.perf_counter() - t1
        items.append(item)
    block["items"] = items
    block["seconds"] = {"read": t_read, "decode": t_decode}
    return pack_block(block)


# ---------------------------------------------------------------- 2. scoring

def _maybe_crash(marker: str | None, what: str = "scoring actor") -> None:
    """Test hook (IQA_SPIDER_SCORE_CRASH_ONCE): kill this worker process once."""
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        log.warning("IQA_SPIDER_SCORE_CRASH_ONCE: %s %d exits holding its block", what, os.getpid())
        os._exit(17)


def _incarnation() -> dict:
    """Which actor process this is: Ray keeps an actor's id across restarts, and says whether
    this process is a restart (its previous one died; Ray Data then retries its block here)."""
    import ray

    ctx = ray.get_runtime_context()
    return {"actor_id": ctx.get_actor_id(), "pid": os.getpid(), "restarted": bool(ctx.was_current_actor_reconstructed)}


class _ScorerBase:
    def __init__(self, describe: bool, ground_questions: list[str], crash_marker: str | None, env: dict | None):
        _apply_env(env)
        self.describe, self.ground_questions = describe, list(ground_questions)
        self.crash_marker = crash_marker
        self.incarnation = _incarnation()
        if self.incarnation["restarted"]:
            log.warning("scoring actor %s restarted in process %d (its previous process died)",
                        (self.incarnation["actor_id"] or "?")[:8], self.incarnation["pid"])

    def meta(self) -> dict:
        raise NotImplementedError

    def score_good(self, items: list[dict], scored_at) -> list[dict]:
        raise NotImplementedError

    def __call__(self, row: dict) -> dict:
        block = unpack_block(row)
        t0 = time.perf_counter()
        scored_at = dt.datetime.now(dt.timezone.utc)
        meta = {**self.meta(), "scored_at": scored_at}
        good = [it for it in block["items"] if it["error"] is None]
        scored = iter(self.score_good(good, scored_at) if good else [])
        rows = []
        for it in block["items"]:
            if it["error"] is not None:
                rows.append(R.error_row(it["key"], it["sha"], it["error"], it["width"], it["height"], **meta))
            else:
                rows.append(next(scored))
        block["rows"] = rows
        block["actor"] = self.incarnation
        block["seconds"]["score"] = time.perf_counter() - t0
        if not block.get("keep_images"):
            for it in block["items"]:
                it["image"] = None
        return pack_block(block)


class Scorer(_ScorerBase):
    """Backend ``actors``: a grounding head (model + segmenter) per actor."""

    def __init__(self, model_cfg, infer_cfg, seg_cfg, model_uri: str, model_version: str | None,
                 describe: bool, ground_questions: list[str], crash_marker: str | None = None,
                 env: dict | None = None):
        super().__init__(describe, ground_questions, crash_marker, env)
        from iqa_spider.infer.predictor import GroundingHead

        self.head = GroundingHead.from_config(model_cfg, infer_cfg, seg_cfg)
        # rows name the model as configured and the version resolved once by the driver
        self.model_uri = model_uri
        self.model_version = self.head.predictor.model_version if model_version is None else model_version

    def meta(self) -> dict:
        return {"model_uri": self.model_uri, "model_version": self.model_version}

    def score_good(self, items: list[dict], scored_at) -> list[dict]:
        from PIL import Image

        def crash_mid_block(batch: int) -> None:  # the crash drill: after the first batch, holding the rest
            if batch == 0 and len(items) > 1:
                _maybe_crash(self.crash_marker)

        decoded = [(it["key"], it["sha"], Image.fromarray(it["image"])) for it in items]
        return self.head.analysis_rows(decoded, self.describe, self.ground_questions, None,
                                       {**self.meta(), "scored_at": scored_at}, after_batch=crash_mid_block)


class ServeScorer(_ScorerBase):
    """Backend ``serve``: the model and grounding deployments of a running Serve application."""

    def __init__(self, app_name: str, model_deployment: str, grounding_deployment: str, timeout_s: float,
                 describe: bool, ground_questions: list[str], crash_marker: str | None = None,
                 env: dict | None = None):
        super().__init__(describe, ground_questions, crash_marker, env)
        from ray import serve

        self.model = serve.get_deployment_handle(model_deployment, app_name=app_name)
        self.grounding = serve.get_deployment_handle(grounding_deployment, app_name=app_name)
        self.timeout_s = timeout_s
        info = self.model.model_info.remote().result(timeout_s=timeout_s)
        self.info = {"model_uri": info.get("model_uri"), "model_version": info.get("model_version")}

    def meta(self) -> dict:
        return dict(self.info)

    def _result(self, response, resend, key: str):
        """The answer of one Serve call; a call that failed in transit (timeout, a replica gone in
        a rolling update) is sent again, SERVE_ATTEMPTS times in all. Past that the block fails
        and the job with it: the image is not at fault, so no error row would be honest, and a
        re-run scores the block again (exactly once)."""
        for attempt in range(1, SERVE_ATTEMPTS + 1):
            try:
                return response.result(timeout_s=self.timeout_s)
            except Exception as exc:
                if attempt == SERVE_ATTEMPTS:
                    raise RuntimeError(f"Serve call for {key} failed {SERVE_ATTEMPTS} times; last: "
                                       f"{type(exc).__name__}: {exc}") from exc
                log.warning("Serve call for %s failed (%s: %s); sending it again (%d/%d)", key,
                            type(exc).__name__, exc, attempt, SERVE_ATTEMPTS - 1)
                time.sleep(SERVE_RETRY_WAIT_S * attempt)
                response = resend()

    def score_good(self, items: list[dict], scored_at) -> list[dict]:
        spec = {"describe": self.describe, "ground": self.ground_questions}
        pending = [self.model.analyze.remote(it["image"], spec) for it in items]  # all in flight: Serve batches them
        results = [self._result(p, lambda it=it: self.model.analyze.remote(it["image"], spec), it["key"])
                   for it, p in zip(items, pending)]
        _maybe_crash(self.crash_marker)
        segs = [self.grounding.segment.remote(it["image"], r["groundings"]) if r.get("groundings") else None
                for it, r in zip(items, results)]
        rows = []
        for it, r, s in zip(items, results, segs):
            meta = {"model_uri": r.get("model_uri"), "model_version": r.get("model_version"), "scored_at": scored_at}
            if r.get("error"):
                rows.append(R.error_row(it["key"], it["sha"], r["error"], r["width"], r["height"], **meta))
                continue
            regions = (self._result(s, lambda it=it, r=r: self.grounding.segment.remote(it["image"], r["groundings"]),
                                    it["key"]) if s is not None else [])
            rows.append(R.result_row(it["key"], it["sha"], r["width"], r["height"], score=r.get("score"),
                                     description=r.get("description"), regions=regions, **meta))
        return rows


# ---------------------------------------------------------------- 3. write

def write_block(row: dict, *, input_uri: str, output_uri: str, masks: bool, overlays: bool,
                env: dict | None = None) -> dict:
    _apply_env(env)
    block = unpack_block(row)
    t0 = time.perf_counter()
    rows = block["rows"]
    keys = [r["image_uri"] for r in rows]
    if keys != block["keys"]:  # exactly once, in block order: anything else is a bug, fail loudly
        raise RuntimeError(f"block {block['name']}: {len(rows)} rows do not match its {len(block['keys'])} keys")
    table = R.rows_to_table(rows)
    summary = report.block_summary(block, rows)
    # Ray retries a task whose worker died; the job counts and says so (its own log, not only Ray's).
    summary["task_retries"] = {"read": int(block.get("read_attempt", 0)), "write": task_attempt()}
    # Masks and overlays first, the shard last: the shard marks its keys done, so a failure
    # in between must leave the keys to the next run, not done without their pictures.
    if masks or overlays:
        images = {it["key"]: it["image"] for it in block["items"]} if overlays else {}
        report.write_artifacts(rows, input_uri, output_uri, masks, images)
    write_table(table, block["uri"], summary=summary)
    summary["seconds"]["write"] = round(time.perf_counter() - t0, 4)
    return {"summary": json.dumps(summary)}


__all__ = ["pack_block", "unpack_block", "read_decode", "Scorer", "ServeScorer", "write_block"]
