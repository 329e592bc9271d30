"""``report.html`` of a scoring output: what people look at after a run.

One self-contained page beside the Parquet: the run's counts and error reasons, the score
histogram, then the lowest-scored images (overlay with the grounding mask and point, score,
level, description, grounding answer) and the inputs that could not be scored, with why.
Images are linked relative to the page (``overlays/...``, ``_histogram.png``), so the page
works wherever the output folder is copied or served from.
"""
from __future__ import annotations

import html
import posixpath

from iqa_spider import storage
from iqa_spider.data.io import read_table
from iqa_spider.score.listing import shard_dir

PAGE_COLUMNS = ("image_uri", "error", "score", "level", "description", "regions")
STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}img{max-width:320px}"
         ".err{color:#a00}")


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def render(output_uri: str, input_uri: str, summary: dict, max_items: int = 48) -> str:
    rows = read_table(shard_dir(output_uri), columns=list(PAGE_COLUMNS)).to_pylist()
    scored = sorted((r for r in rows if r["error"] is None), key=lambda r: r["score"])
    failed = sorted((r for r in rows if r["error"] is not None), key=lambda r: r["image_uri"] or "")
    has_overlays = storage.exists(storage.join(output_uri, "overlays"))

    def image_cell(row: dict) -> str:
        if not has_overlays:
            return ""
        link = posixpath.join("overlays", storage.relative_key(input_uri, row["image_uri"]) + ".jpg")
        return f"<a href='{_esc(link)}'><img src='{_esc(link)}' alt='overlay'/></a>"

    def grounding(row: dict) -> str:
        return "<br/>".join(
            f"{_esc(g['answer'])}" + (f" <i>(point {g['point_x']:.0f}, {g['point_y']:.0f}; mask "
                                      f"{g['mask_area']} px)</i>" if g["point_x"] is not None else "")
            for g in row["regions"] or [])

    items = "".join(
        f"<tr><td>{image_cell(r)}</td><td><b>{r['score']:.2f}</b> {_esc(r['level'])}<br/>"
        f"<small>{_esc(r['image_uri'])}</small></td><td>{_esc(r['description'])}</td><td>{grounding(r)}</td></tr>"
        for r in scored[:max_items])
    errors = "".join(f"<tr><td>{_esc(r['image_uri'])}</td><td class='err'>{_esc(r['error'])}</td></tr>"
                     for r in failed)
    counts = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in
                     [("rows", summary["rows"]), ("scored", summary["scored"]), ("mean score", summary["score_mean"]),
                      ("model", f"{summary.get('model_uri')} (version {summary.get('model_version')})"),
                      *[(f"error: {k}", v) for k, v in sorted(summary["errors"].items())]])
    hist = "<img src='_histogram.png' alt='score histogram'/>" if storage.exists(
        storage.join(output_uri, "_histogram.png")) else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>IQA-Spider scores</title>"
            f"<style>{STYLE}</style></head><body><h1>IQA-Spider scores</h1>"
            f"<p>{_esc(input_uri)} &rarr; {_esc(output_uri)}</p><table>{counts}</table>{hist}"
            f"<h2>Lowest scores first ({min(len(scored), max_items)} of {len(scored)})</h2>"
            f"<table><tr><th>worst region</th><th>score</th><th>description</th><th>grounding</th></tr>{items}</table>"
            f"<h2>Not scored ({len(failed)})</h2><table>{errors}</table></body></html>")


def write(output_uri: str, input_uri: str, summary: dict, max_items: int = 48) -> str:
    """The page for `output_uri` given the run summary the job just computed."""
    uri = storage.join(output_uri, "report.html")
    storage.write_bytes(uri, render(output_uri, input_uri, summary, max_items).encode())
    return uri
