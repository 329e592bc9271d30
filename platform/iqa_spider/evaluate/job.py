"""The evaluation job: a model (+ segmenter) against a dataset's test split.

For each image of the split the job asks, in one shared-prefix run, every question its
samples ask (the dataset's own question), plus the Q-Align score when the image has a rating
sample, plus a teacher-forced pass over each grounding sample's *true* answer. It scores each
sample against its ``target`` (the metrics are in :mod:`iqa_spider.evaluate.metrics`) and writes
the report (:mod:`iqa_spider.evaluate.report`): the metrics dict (returned, printed by the job),
the chance baselines of the same truth (:mod:`iqa_spider.evaluate.chance`), ``report.json``,
``predictions.parquet``, ``report.html`` and its plots under ``output.uri``, and MLflow.

With ``data.shuffle_images`` (the shuffled-image control) every image's samples are asked
about another image of the split (:func:`shuffled_donors`), resized to the sample's size so
the truth masks still apply; questions and truth are unchanged.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import numpy as np

from iqa_spider import storage
from iqa_spider.data.io import read_dataset
from iqa_spider.entrypoint import run_job
from iqa_spider.evaluate.chance import chance_baselines
from iqa_spider.evaluate.config import EvaluateConfig
from iqa_spider.evaluate.metrics import (
    compute_metrics,
    grounding_sample_metrics,
    is_whole_region,
    target_mask,
    target_regions,
    truth_families,
    truth_pairs,
    truth_stratum,
)
from iqa_spider.evaluate.report import format_metrics, publish
from iqa_spider.images import ImageError, decode_image, prepare_image
from iqa_spider.infer.config import MAPPING_NAMES
from iqa_spider.infer.planning import Plan
from iqa_spider.infer.queries import Query
from iqa_spider.infer.text_to_point import answer_position_words
from iqa_spider.vocab import SCORE_QUESTION

log = logging.getLogger(__name__)


def _load_split(cfg: EvaluateConfig):
    storage.require_input(cfg.data.uri, "data.uri")
    table = read_dataset(cfg.data.uri)
    rows = table.to_pylist()
    rows = [r for r in rows if (cfg.data.split == "all" or r["split"] == cfg.data.split) and r["task"] in cfg.data.tasks]
    by_image: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_image[r["image_id"]].append(r)
    ids = sorted(by_image)
    if cfg.data.max_images is not None:
        ids = ids[: cfg.data.max_images]
    return [(i, by_image[i]) for i in ids]


def _image_of(row: dict):
    data = row["image"] if row["image"] is not None else storage.read_with_retry(row["image_uri"])
    return decode_image(data)


def shuffled_donors(sources: list[str], seed: int) -> list[int]:
    """The shuffled-image control's permutation: ``donor[i]`` is the image shown in place of
    image ``i``; no image is its own donor, and no donor shares image ``i``'s source photo
    unless one source holds more than half the images. Fixed by ``seed``.

    The images are ordered source by source (sources and the images in each in a seeded
    random order) and each takes the image ``m`` places further on (cyclically), ``m`` the
    largest source's image count: a source's block is at most ``m`` long, so the donor lies
    outside it whenever ``2 m <= n``."""
    n = len(sources)
    if n < 2:
        raise ValueError(f"data.shuffle_images needs at least 2 images, the split has {n}")
    rng = np.random.default_rng(seed)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, src in enumerate(sources):
        by_source[src].append(i)
    blocks = [by_source[k] for k in sorted(by_source)]
    order = [int(i) for b in rng.permutation(len(blocks)) for i in rng.permutation(blocks[b])]
    m = max(len(b) for b in blocks)
    shift = m if m < n else 1
    donor = [0] * n
    for pos, i in enumerate(order):
        donor[i] = order[(pos + shift) % n]
    return donor


def _source_of(rows: list[dict]) -> str:
    return rows[0].get("source_uri") or rows[0]["image_id"]


def _shown_image(groups, donors, idx: int):
    """The image shown for group ``idx``: its own, or (control) its donor's at its own size."""
    from PIL import Image

    rows = groups[idx][1]
    if donors is None:
        return groups[idx][0], prepare_image(_image_of(rows[0]))
    donor_id, donor_rows = groups[donors[idx]]
    img = prepare_image(_image_of(donor_rows[0]))
    size = (int(rows[0]["width"]), int(rows[0]["height"]))
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return donor_id, img


def _plan_for(rows: list[dict], cfg: EvaluateConfig) -> Plan:
    """The dataset's own questions about one image: the score once if any row rates it, each
    question generated (key: its row), and each grounding question also teacher-forced with the
    true answer, so the mappings are measured on the model's logits at the true position words."""
    plan = Plan()
    if any(r["task"] == "rating" for r in rows):
        plan.ask(Query(SCORE_QUESTION, mode="score"), "score")
    for k, r in enumerate(rows):
        if r["task"] == "rating":
            continue
        cap = cfg.infer.describe_max_new_tokens if r["task"] in ("global_desc", "local_desc", "referring_long") \
            else cfg.infer.max_new_tokens
        plan.ask(Query(r["question"], max_new_tokens=cap), "generate", k)
        if r["task"] == "grounding":
            plan.ask(Query(r["question"], mode="force", answer=r["answer"]), "force", k)
    return plan


def evaluate(cfg: EvaluateConfig, head=None) -> dict:
    """Run the evaluation; returns the report (``metrics`` plus counts and provenance)."""
    from iqa_spider.infer.predictor import GroundingHead

    started = time.monotonic()
    mappings = list(dict.fromkeys([cfg.infer.mapping] + (list(cfg.mappings) or list(MAPPING_NAMES))))
    groups = _load_split(cfg)
    control: dict[str, Any] = {"shuffle_images": bool(cfg.data.shuffle_images)}
    donors = None
    if cfg.data.shuffle_images:
        donors = shuffled_donors([_source_of(rows) for _, rows in groups], cfg.data.shuffle_seed)
        control.update(seed=cfg.data.shuffle_seed, images=len(groups),
                       same_source_pairs=sum(_source_of(groups[i][1]) == _source_of(groups[d][1])
                                             for i, d in enumerate(donors)))
        log.warning("evaluate: shuffled-image CONTROL run: every sample is asked about another image")
    if head is None:
        head = GroundingHead.from_config(cfg.model, cfg.infer, cfg.segmenter)
    predictor = head.predictor
    skipped: dict[str, int] = defaultdict(int)
    samples: list[dict] = []          # one per evaluated sample, with its prediction
    drawn: list[dict] = []            # grounding samples for the HTML page
    chunk = max(1, cfg.infer.batch_size) * 4
    for start in range(0, len(groups), chunk):
        batch = []
        for idx in range(start, min(start + chunk, len(groups))):
            rows = groups[idx][1]
            try:
                batch.append((rows, *_shown_image(groups, donors, idx)))
            except (ImageError, *storage.transient_errors()) as exc:
                skipped[getattr(exc, "reason", "unreadable")] += len(rows)
        if not batch:
            continue
        plans = [_plan_for(rows, cfg) for rows, _, _ in batch]
        results = predictor.run([b[2] for b in batch], [plan.queries for plan in plans])
        for (rows, shown_id, image), plan, res in zip(batch, plans, results):
            recs = _score_image(head, cfg, mappings, image, rows, plan, res, drawn)
            for rec in recs:
                rec["shown_image_id"] = shown_id
            samples.extend(recs)
        done = min(start + chunk, len(groups))
        elapsed = time.monotonic() - started
        log.info("evaluate: %d/%d images, %d samples, %.2f images/s, skipped %s", done, len(groups), len(samples),
                 done / max(elapsed, 1e-9), dict(skipped) or "none")
    report = {
        "model_uri": predictor.model_uri, "model_version": predictor.model_version,
        "data_uri": cfg.data.uri, "split": cfg.data.split, "mapping": cfg.infer.mapping, "tau": cfg.infer.tau,
        "segmenter": cfg.segmenter.kind, "mappings": mappings,
        "images": len(groups), "samples": len(samples), "skipped_samples": dict(skipped), "control": control,
        "metrics": compute_metrics(samples, mappings, cfg.infer.mapping),
    }
    report["chance"], report["chance_basis"] = chance_baselines(samples, mappings)
    report["seconds"] = round(time.monotonic() - started, 2)
    publish(cfg, report, samples, drawn)
    return report


def _score_image(head, cfg: EvaluateConfig, mappings: list[str], image, rows: list[dict], plan: Plan,
                 results, drawn: list[dict]) -> list[dict]:
    """Per-sample predictions and per-sample metric inputs for one image."""
    predictor = head.predictor
    w, h = image.size
    out: list[dict] = []
    score = None
    generated: dict[int, Any] = {}
    forced: dict[int, Any] = {}
    for kind, k, _, r in plan.answers(results):
        if kind == "score":
            score = predictor.score_of(r)
        elif kind == "generate":
            generated[k] = r
        else:
            forced[k] = r
    # groundings (generated and forced) and one segmenter call for every point of every mapping
    ground_rows = [k for k, r in enumerate(rows) if r["task"] == "grounding"]
    g_gen = {k: predictor.grounding_of(generated[k], rows[k]["question"], w, h) for k in ground_rows}
    g_forced = {k: predictor.grounding_of(forced[k], rows[k]["question"], w, h) for k in ground_rows}
    requests: list[tuple[str, int, str]] = []   # (which, row, mapping)
    point_sets: list[list[tuple[float, float]]] = []
    points: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for which, gs in (("gen", g_gen), ("forced", g_forced)):
        for k, g in gs.items():
            for m in mappings:
                pts = [(p.x, p.y) for p in g.points_by(m, cfg.infer.tau)]
                points[(which, k, m)] = pts
                for p in pts:
                    requests.append((which, k, m))
                    point_sets.append([p])
    masks: dict[tuple[str, int, str], np.ndarray] = {}
    if point_sets:
        for key, mk in zip(requests, head.segmenter.segment_many(image, point_sets)):
            masks[key] = mk if key not in masks else (masks[key] | mk)
    for k, row in enumerate(rows):
        target = row["target"] or {}
        rec: dict[str, Any] = {"sample_id": row["sample_id"], "image_id": row["image_id"], "task": row["task"],
                               "subtask": row["subtask"], "question": row["question"], "truth": row["answer"],
                               "width": w, "height": h, "target_score": target.get("quality_score"),
                               "target_level": target.get("quality_level")}
        if row["task"] == "rating":
            rec.update(pred=None, score=score.score if score else None, level=score.level if score else None)
            out.append(rec)
            continue
        rec["pred"] = generated[k].text if k in generated else None
        regions = target_regions(target)
        rec["truth_families"] = sorted(truth_families(regions))
        rec["truth_pairs"] = sorted(f"{t}:{s}" for t, s in truth_pairs(regions))
        rec["truth_stratum"] = truth_stratum(regions, w, h)
        rec["truth_positions"] = sorted({" ".join(r["position"]) for r in regions
                                         if r.get("position") and not is_whole_region(r, w, h)})
        if row["task"] == "grounding":
            tmask = target_mask(target, w, h)
            twhole = bool(target.get("whole_image"))
            rec["truth_area_frac"] = float(tmask.mean()) if tmask.size else 0.0
            g = g_gen[k]
            rec["whole_image"] = g.whole_image
            rec["truth_whole"] = twhole
            for which, gs in (("mapping", g_gen), ("forced", g_forced)):
                key_which = "gen" if which == "mapping" else "forced"
                for m in mappings:
                    pts = points[(key_which, k, m)]
                    hit, iou_ = grounding_sample_metrics(gs[k].whole_image, pts, masks.get((key_which, k, m)),
                                                         tmask, twhole)
                    rec[f"{which}.{m}.hit"], rec[f"{which}.{m}.iou"] = hit, iou_
            truth_pos = tuple(regions[0]["position"]) if regions and regions[0].get("position") else None
            rec["truth_position"] = "whole image" if twhole else (" ".join(truth_pos) if truth_pos else None)
            if twhole:
                rec["position_ok"] = float(g.whole_image)
            else:
                said = answer_position_words(rec["pred"] or "")
                rec["position_ok"] = float(bool(said) and not g.whole_image and truth_pos is not None
                                           and tuple(said[0]) == truth_pos)
            pts = points[("gen", k, cfg.infer.mapping)]
            rec["point_x"], rec["point_y"] = (pts[0] if pts else (None, None))
            if len(drawn) < cfg.output.html_max_items:
                drawn.append({"image": image, "truth_mask": tmask, "points": pts,
                              "mask": (np.ones((h, w), bool) if g.whole_image else masks.get(("gen", k, cfg.infer.mapping))),
                              "question": row["question"], "truth": row["answer"], "pred": rec["pred"],
                              "hit": rec[f"mapping.{cfg.infer.mapping}.hit"],
                              "iou": rec[f"mapping.{cfg.infer.mapping}.iou"], "subtask": row["subtask"]})
        out.append(rec)
    return out


def run_evaluate(cfg: EvaluateConfig) -> dict:
    report = evaluate(cfg)
    print(f"evaluated {report['model_uri']} (version {report['model_version']}) on {report['data_uri']} "
          f"[{report['split']}]: {report['images']} images, {report['samples']} samples, {report['seconds']} s")
    if report["control"]["shuffle_images"]:
        print("CONTROL RUN (data.shuffle_images): every sample was asked about another image, truth kept")
    print(format_metrics(report["metrics"]))
    if report.get("output_uri"):
        print(f"report: {report['output_uri']}")
    if report.get("mlflow_run_id"):
        print(f"mlflow run: {report['mlflow_run_id']}")
    return report


def main(argv=None) -> int:
    return run_job(EvaluateConfig, run_evaluate, argv,
                   description="evaluate: a model (+ segmenter) on a dataset's test split")
