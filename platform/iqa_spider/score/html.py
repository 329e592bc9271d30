"""``report.html`` of a scoring output: what people look at after a run.

One self-contained page beside the Parquet: the run's counts and error reasons, the score
histogram, then the lowest-scored images (overlay with the grounding mask and point, score,
level, description, grounding answer) and the inputs that could not be scored, with why.
Images are linked relative to the page (``overlays/...``, ``_histogram.png``), so the page
works wherever the output folder is copied or served from.
"""
from __future__ import annotations

import posixpath

from iqa_spider import storage
from iqa_spider.data.io import read_table
from iqa_spider.score.listing import shard_dir
from iqa_spider.templating import html_templates

PAGE_COLUMNS = ("image_uri", "error", "score", "level", "description", "regions")
TEMPLATES = html_templates("iqa_spider.score")


def render(output_uri: str, input_uri: str, summary: dict, max_items: int = 48) -> str:
    rows = read_table(shard_dir(output_uri), columns=list(PAGE_COLUMNS)).to_pylist()
    scored = sorted((r for r in rows if r["error"] is None), key=lambda r: r["score"])
    failed = sorted((r for r in rows if r["error"] is not None), key=lambda r: r["image_uri"] or "")
    has_overlays = storage.exists(storage.join(output_uri, "overlays"))

    def overlay(row: dict) -> str | None:
        if not has_overlays:
            return None
        return posixpath.join("overlays", storage.relative_key(input_uri, row["image_uri"]) + ".jpg")

    def grounding(row: dict) -> list[dict]:
        return [{"answer": g["answer"],
                 "where": (f"point {g['point_x']:.0f}, {g['point_y']:.0f}; mask {g['mask_area']} px"
                           if g["point_x"] is not None else None)} for g in row["regions"] or []]

    items = [{"overlay": overlay(r), "score": f"{r['score']:.2f}", "level": r["level"], "image_uri": r["image_uri"],
              "description": r["description"] or "", "grounding": grounding(r)} for r in scored[:max_items]]
    counts = [("rows", summary["rows"]), ("scored", summary["scored"]), ("mean score", summary["score_mean"]),
              ("model", f"{summary.get('model_uri')} (version {summary.get('model_version')})"),
              *[(f"error: {k}", v) for k, v in sorted(summary["errors"].items())]]
    return TEMPLATES.get_template("report.html.j2").render(
        input_uri=input_uri, output_uri=output_uri, counts=counts, items=items, scored=len(scored), failed=failed,
        histogram=storage.exists(storage.join(output_uri, "_histogram.png")))


def write(output_uri: str, input_uri: str, summary: dict, max_items: int = 48) -> str:
    """The page for `output_uri` given the run summary the job just computed."""
    uri = storage.join(output_uri, "report.html")
    storage.write_bytes(uri, render(output_uri, input_uri, summary, max_items).encode())
    return uri
