"""What the scoring job reports: per-block summaries (kept in each shard's Parquet metadata),
the run summary (``_summary.json``), the score histogram (``_histogram.png``) and the optional
per-image artifacts (mask PNGs, overlay JPEGs)."""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np

from iqa_spider import storage
from iqa_spider.data import rle

log = logging.getLogger(__name__)
STAGES = ("read", "decode", "score", "write")
HIST_BINS = np.linspace(1.0, 5.0, 17)


def reason(error: str) -> str:
    """The short, countable reason of an ``error`` ("corrupt: broken data stream" -> corrupt)."""
    return error.split(":", 1)[0].strip() or "error"


def block_summary(block: dict, rows: list[dict]) -> dict:
    errors = Counter(reason(r["error"]) for r in rows if r["error"] is not None)
    return {"shard": block["name"], "keys": len(rows), "scored": len(rows) - sum(errors.values()),
            "errors": dict(errors), "model_version": next((r["model_version"] for r in rows), None),
            "scores": [round(r["score"], 5) for r in rows if r["score"] is not None],
            "seconds": {k: round(v, 4) for k, v in block["seconds"].items()},
            "actor": block.get("actor")}


def restarted_actors(summaries: Iterable[dict]) -> set[tuple[str, int]]:
    """(actor id, pid) of every restarted scoring-actor process that wrote a block: each is one
    restart after a crash, and the block it was holding was retried there."""
    return {(a["actor_id"], a["pid"]) for a in (s.get("actor") for s in summaries) if a and a.get("restarted")}


def task_retries(summaries: Iterable[dict]) -> dict[str, int]:
    """Retries of the read and write tasks (each one a worker that died under its block)."""
    out = Counter()
    for s in summaries:
        out.update(s.get("task_retries") or {})
    return {stage: int(out.get(stage, 0)) for stage in ("read", "write")}


def histogram(scores: Iterable[float]) -> dict:
    counts, edges = np.histogram(np.asarray(list(scores), dtype=float), bins=HIST_BINS)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def run_summary(new: list[dict], prior_keys: dict, prior_scores: list[float], *, skipped: int, listed: int,
                ignored: int, seconds: dict, backend: str, model_uri: str, model_version: str | None) -> dict:
    """The whole output after this run (prior shards + new ones), and what this run did."""
    errors = Counter(reason(e) for e in prior_keys.values() if e is not None)
    scores = list(prior_scores)
    stage_s = Counter()
    run_errors = Counter()
    for s in new:
        errors.update(s["errors"])
        run_errors.update(s["errors"])
        scores.extend(s["scores"])
        stage_s.update(s["seconds"])
    total = len(prior_keys) + sum(s["keys"] for s in new)
    this_run = {"keys": sum(s["keys"] for s in new), "scored": sum(s["scored"] for s in new),
                "errors": dict(run_errors), "skipped_already_done": skipped, "shards_written": len(new),
                "stage_seconds": {k: round(stage_s.get(k, 0.0), 3) for k in STAGES},
                "actor_restarts": len(restarted_actors(new)),
                "task_retries": task_retries(new)}
    this_run["slowest_stage"] = max(STAGES, key=lambda k: stage_s.get(k, 0.0)) if new else None
    return {"inputs_listed": listed, "ignored_files": ignored, "rows": total, "scored": total - sum(errors.values()),
            "errors": dict(errors), "score_mean": round(float(np.mean(scores)), 4) if scores else None,
            "score_histogram": histogram(scores), "this_run": this_run, "seconds": seconds,
            "backend": backend, "model_uri": model_uri, "model_version": model_version}


def write_histogram_png(summary: dict, uri: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no histogram picture")
        return False
    h = summary["score_histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.bar(h["edges"][:-1], h["counts"], width=np.diff(h["edges"]), align="edge", edgecolor="black", color="#4c72b0")
    ax.set_xlabel("score (1 bad .. 5 excellent)")
    ax.set_ylabel("images")
    ax.set_title(f"{summary['scored']} scored, {sum(summary['errors'].values())} errors "
                 f"(model {summary['model_version'] or summary['model_uri']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
    return True


# ---------------------------------------------------------------- artifacts

def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def overlay(image: np.ndarray, masks: list[np.ndarray], points: list[tuple[float, float]]) -> bytes:
    """The image with the masks tinted red and the points as blue dots, as JPEG."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32).copy()
    for m in masks:
        out[m] = 0.55 * out[m] + 0.45 * np.array([255, 0, 0], np.float32)
    pil = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    r = max(2, min(pil.size) // 60)
    for x, y in points:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(0, 90, 255), outline=(255, 255, 255))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_artifacts(rows: list[dict], input_uri: str, output_uri: str, masks: bool,
                    images: dict[str, np.ndarray]) -> None:
    """masks/<key>.<k>.png (one per region with a mask) and overlays/<key>.jpg."""

    for row in rows:
        if row["error"] is not None:
            continue
        rel = storage.relative_key(input_uri, row["image_uri"])
        decoded = [rle.decode(r["mask_rle"]) if r["mask_rle"] is not None else None for r in row["regions"]]
        if masks:
            for k, m in enumerate(decoded):
                if m is not None:
                    storage.write_bytes(storage.join(output_uri, "masks", f"{rel}.{k}.png"), _png(m))
        img = images.get(row["image_uri"])
        if img is not None:
            points = [(r["point_x"], r["point_y"]) for r in row["regions"] if r["point_x"] is not None]
            storage.write_bytes(storage.join(output_uri, "overlays", f"{rel}.jpg"),
                                overlay(img, [m for m in decoded if m is not None], points))


def dumps(summary: dict) -> bytes:
    return json.dumps(summary, indent=2, default=str).encode()


__all__ = ["block_summary", "run_summary", "write_histogram_png", "write_artifacts", "overlay",
           "reason", "histogram"]
