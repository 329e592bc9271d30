"""The evaluation harness: a model (+ segmenter) against a dataset's test split.

For each image of the split the harness asks, in one shared-prefix run, every question its
samples ask (the dataset's own question), plus the Q-Align score when the image has a rating
sample, plus a teacher-forced pass over each grounding sample's *true* answer. Then, per task,
with no external judge (the ``target`` column holds the truth):

- **rating**: SRCC and PLCC of the predicted score against ``quality_score`` (PLCC after the
  standard 4-parameter logistic fit of VQEG; ``plcc_linear`` without it), and level accuracy.
- **grounding** (per subtask hyd / sid / dao, and ``all``): point accuracy (the point lies in
  the union of the target regions' masks), mIoU of the segmenter's mask against that union,
  position-word accuracy (the answer's first "vertical horizontal" words equal the target
  region's), with the whole-image rule (an answer about the whole image is a full mask and
  no point: right, with IoU 1, exactly when the target is the whole image). Point accuracy
  and mIoU are given for every text-to-point mapping on the same answers
  (``mapping.<name>``), and again on the teacher-forced true answers (``forced.<name>``),
  which measures the mappings apart from what the model chose to write.
- **referring_short / referring_long**: distortion-type precision / recall / F1 of the answer
  against the target region's distortions, (type, severity) pair F1, exact match.
- **global_desc / local_desc**: distortion-type precision / recall / F1, position agreement
  (precision / recall / F1 of the "vertical horizontal" mentions against the distorted
  regions' positions; global only), and level accuracy (the level word of the last sentence
  against ``quality_level``; global only: a local description's level has no truth column).

Outputs: the metrics dict (returned, printed by the job), ``report.json``,
``predictions.parquet`` (one row per sample), ``report.html`` (image, truth mask, predicted
point and mask overlaid for grounding samples) under ``output.uri``, and MLflow metrics.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from iqa_spider.infer.config import MAPPING_NAMES, EvaluateConfig
from iqa_spider.infer.text_to_point import answer_position_words
from iqa_spider.vocab import DISTORTION_TERMS, LEVEL_WORDS, SEVERITY_WORDS

log = logging.getLogger(__name__)

_TERM_TO_FAMILY = {term: fam for fam, term in DISTORTION_TERMS.items()}
_SEVERITY_OF = {w: k for k, w in SEVERITY_WORDS.items()}
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
GROUNDING_SUBTASKS = ("hyd", "sid", "dao")

# ============================================================== metrics (pure functions)


def srcc(pred: Sequence[float], target: Sequence[float]) -> float:
    """Spearman rank correlation (nan when undefined: fewer than 2 values or a constant)."""
    from scipy.stats import spearmanr

    p, t = np.asarray(pred, float), np.asarray(target, float)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return float("nan")
    return float(spearmanr(p, t).statistic)


def logistic4(x, b1: float, b2: float, b3: float, b4: float):
    """VQEG's 4-parameter logistic: (b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2."""
    z = np.clip(-(np.asarray(x, float) - b3) / (b4 if abs(b4) > 1e-12 else 1e-12), -60, 60)
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def _logistic4_jac(x, b1: float, b2: float, b3: float, b4: float):
    b4 = b4 if abs(b4) > 1e-12 else 1e-12
    x = np.asarray(x, float)
    s = 1.0 / (1.0 + np.exp(np.clip(-(x - b3) / b4, -60, 60)))
    ds = s * (1.0 - s) * (b1 - b2)
    return np.stack([s, 1.0 - s, -ds / b4, -ds * (x - b3) / b4 ** 2], axis=1)


def _pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def plcc(pred: Sequence[float], target: Sequence[float], fit: bool = True) -> tuple[float, str]:
    """PLCC after the 4-parameter logistic fit of pred -> target; ``(value, how)`` where how is
    "logistic", or "linear" when there are too few points (< 5) or the fit fails."""
    from scipy.optimize import curve_fit

    p, t = np.asarray(pred, float), np.asarray(target, float)
    if fit and len(p) >= 5 and np.ptp(p) > 0 and np.ptp(t) > 0:
        p0 = [t.max(), t.min(), float(np.mean(p)), float(np.std(p)) or 1.0]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # OptimizeWarning on a flat covariance: the fit is still used
                params, _ = curve_fit(logistic4, p, t, p0=p0, jac=_logistic4_jac, maxfev=20000)
            fitted = logistic4(p, *params)
            value = _pearson(fitted, t)
            if math.isfinite(value):
                return value, "logistic"
        except (RuntimeError, ValueError, FloatingPointError):
            pass
    return _pearson(p, t), "linear"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def point_in_mask(x: float, y: float, mask: np.ndarray) -> bool:
    h, w = mask.shape
    xi, yi = int(min(max(math.floor(x), 0), w - 1)), int(min(max(math.floor(y), 0), h - 1))
    return bool(mask[yi, xi])


def distortion_families(text: str) -> set[str]:
    """Distortion families an answer names (by their vocabulary terms)."""
    return {_TERM_TO_FAMILY[w] for w in _WORD.findall((text or "").lower()) if w in _TERM_TO_FAMILY}


def distortion_pairs(text: str) -> set[tuple[str, int]]:
    """(family, severity) pairs an answer names as "<severity word> <term>"."""
    words = _WORD.findall((text or "").lower())
    return {(_TERM_TO_FAMILY[b], _SEVERITY_OF[a]) for a, b in zip(words, words[1:])
            if a in _SEVERITY_OF and b in _TERM_TO_FAMILY}


def answer_level(text: str) -> str | None:
    """The level word of the last sentence that has one ("Overall, the quality ... is poor.")."""
    for sentence in reversed([s for s in re.split(r"[.!?]", (text or "").lower()) if s.strip()]):
        found = [w for w in _WORD.findall(sentence) if w in LEVEL_WORDS]
        if found:
            return found[-1]
    return None


@dataclass
class PRF:
    """Micro-averaged precision / recall / F1 over sets; empty-vs-empty counts as perfect."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    exact: int = 0
    n: int = 0

    def add(self, pred: set, truth: set) -> None:
        self.tp += len(pred & truth)
        self.fp += len(pred - truth)
        self.fn += len(truth - pred)
        self.exact += int(pred == truth)
        self.n += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else (1.0 if self.fn == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else (1.0 if self.fp == 0 else 0.0)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}precision": self.precision, f"{prefix}recall": self.recall, f"{prefix}f1": self.f1}


# ============================================================== truth helpers


def _decode(rle_: dict) -> np.ndarray:
    from iqa_spider.data import rle

    return rle.decode(rle_)


def target_regions(target: dict) -> list[dict]:
    ids = set(target.get("target_region_ids") or [])
    return [r for r in (target.get("regions") or []) if r["region_id"] in ids]


def target_mask(target: dict, width: int, height: int) -> np.ndarray:
    """Union of the target regions' masks; the full mask for a whole-image target."""
    if target.get("whole_image"):
        return np.ones((height, width), dtype=bool)
    mask = np.zeros((height, width), dtype=bool)
    for r in target_regions(target):
        if r.get("mask_rle") is not None:
            m = _decode(r["mask_rle"])
            if m.shape == mask.shape:
                mask |= m
    return mask


def _is_whole(region: dict, width: int, height: int) -> bool:
    from iqa_spider.data import rle

    return region.get("mask_rle") is not None and rle.area(region["mask_rle"]) == width * height


def truth_families(regions: Iterable[dict]) -> set[str]:
    return {d["type"] for r in regions for d in (r.get("distortions") or [])}


def truth_pairs(regions: Iterable[dict]) -> set[tuple[str, int]]:
    return {(d["type"], int(d["severity"])) for r in regions for d in (r.get("distortions") or [])}


# ============================================================== metric accumulation


@dataclass
class _GroundAcc:
    hits: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ious: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    position: list[float] = field(default_factory=list)
    whole: list[float] = field(default_factory=list)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def grounding_sample_metrics(pred_whole: bool, points: Sequence[tuple[float, float]], pred_mask: np.ndarray | None,
                             truth_mask: np.ndarray, truth_whole: bool) -> tuple[float, float]:
    """(hit, iou) of one grounding prediction under the whole-image rule.

    A whole-image answer is the full mask with no point: a hit exactly when the target is the
    whole image. Otherwise a hit when the first point lies in the target mask; no point (an
    answer without position words) is a miss with an empty mask.
    """
    h, w = truth_mask.shape
    if pred_whole:
        return float(truth_whole), iou(np.ones((h, w), bool), truth_mask)
    if not points:
        return 0.0, iou(np.zeros((h, w), bool), truth_mask)
    hit = point_in_mask(points[0][0], points[0][1], truth_mask)
    return float(hit), iou(pred_mask if pred_mask is not None else np.zeros((h, w), bool), truth_mask)


def rating_metrics(pred: Sequence[float], target: Sequence[float], pred_levels: Sequence[str] = (),
                   target_levels: Sequence[str] = ()) -> dict[str, float]:
    out: dict[str, float] = {"n": float(len(pred))}
    out["srcc"] = srcc(pred, target)
    out["plcc"], how = plcc(pred, target)
    out["plcc_linear"] = _pearson(pred, target)
    out["plcc_fit_logistic"] = float(how == "logistic")
    if pred_levels and target_levels:
        out["level_acc"] = _mean([float(a == b) for a, b in zip(pred_levels, target_levels)])
    return out


# ============================================================== the harness


def _load_split(cfg: EvaluateConfig):
    from iqa_spider.data.io import read_dataset

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
    from iqa_spider import storage
    from iqa_spider.images import decode_image

    data = row["image"] if row["image"] is not None else storage.read_bytes(row["image_uri"])
    return decode_image(data)


def _queries_for(rows: list[dict], cfg: EvaluateConfig):
    from iqa_spider.infer.engine import Query
    from iqa_spider.vocab import SCORE_QUESTION

    queries, slots = [], []  # slots[k] = (row index or -1 for the score, kind)
    if any(r["task"] == "rating" for r in rows):
        queries.append(Query(SCORE_QUESTION, mode="score"))
        slots.append((-1, "score"))
    for k, r in enumerate(rows):
        if r["task"] == "rating":
            continue
        cap = cfg.infer.describe_max_new_tokens if r["task"] in ("global_desc", "local_desc", "referring_long") \
            else cfg.infer.max_new_tokens
        queries.append(Query(r["question"], max_new_tokens=cap))
        slots.append((k, "generate"))
        if r["task"] == "grounding":
            queries.append(Query(r["question"], mode="force", answer=r["answer"]))
            slots.append((k, "force"))
    return queries, slots


def evaluate(cfg: EvaluateConfig, head=None) -> dict:
    """Run the evaluation; returns the report (``metrics`` plus counts and provenance)."""
    from iqa_spider.images import ImageError
    from iqa_spider.infer.predictor import GroundingHead, prepare_image

    started = time.monotonic()
    mappings = list(dict.fromkeys([cfg.infer.mapping] + (list(cfg.mappings) or list(MAPPING_NAMES))))
    groups = _load_split(cfg)
    if head is None:
        head = GroundingHead.from_config(cfg.model, cfg.infer, cfg.segmenter)
    predictor = head.predictor
    skipped: dict[str, int] = defaultdict(int)
    samples: list[dict] = []          # one per evaluated sample, with its prediction
    drawn: list[dict] = []            # grounding samples for the HTML page
    chunk = max(1, cfg.infer.batch_size) * 4
    for start in range(0, len(groups), chunk):
        batch = []
        for image_id, rows in groups[start:start + chunk]:
            try:
                batch.append((image_id, rows, prepare_image(_image_of(rows[0]))))
            except (ImageError, OSError) as exc:
                skipped[getattr(exc, "reason", "unreadable")] += len(rows)
        if not batch:
            continue
        per_image = [_queries_for(rows, cfg) for _, rows, _ in batch]
        results = predictor.run([b[2] for b in batch], [q for q, _ in per_image])
        for (image_id, rows, image), (queries, slots), res in zip(batch, per_image, results):
            samples.extend(_score_image(head, cfg, mappings, image, rows, queries, slots, res, drawn))
    report = {
        "model_uri": predictor.model_uri, "model_version": predictor.model_version,
        "data_uri": cfg.data.uri, "split": cfg.data.split, "mapping": cfg.infer.mapping, "tau": cfg.infer.tau,
        "segmenter": cfg.segmenter.kind, "mappings": mappings,
        "images": len(groups), "samples": len(samples), "skipped_samples": dict(skipped),
        "metrics": compute_metrics(samples, mappings, cfg.infer.mapping),
    }
    report["seconds"] = round(time.monotonic() - started, 2)
    try:
        _write_outputs(cfg, report, samples, drawn)
        _log_mlflow(cfg, report)
    finally:  # the local copy only feeds output.uri and MLflow: promotions evaluate often
        shutil.rmtree(report.pop("_local_dir", ""), ignore_errors=True)
    return report


def _score_image(head, cfg: EvaluateConfig, mappings: list[str], image, rows: list[dict], queries, slots,
                 results, drawn: list[dict]) -> list[dict]:
    """Per-sample predictions and per-sample metric inputs for one image."""
    predictor = head.predictor
    w, h = image.size
    out: list[dict] = []
    score = None
    generated: dict[int, Any] = {}
    forced: dict[int, Any] = {}
    for (k, kind), q, r in zip(slots, queries, results):
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
                               "width": w, "height": h}
        if row["task"] == "rating":
            rec.update(pred=None, score=score.score if score else None, level=score.level if score else None,
                       target_score=target.get("quality_score"), target_level=target.get("quality_level"))
            out.append(rec)
            continue
        rec["pred"] = generated[k].text if k in generated else None
        if row["task"] == "grounding":
            tmask = target_mask(target, w, h)
            twhole = bool(target.get("whole_image"))
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
            regions = target_regions(target)
            if twhole:
                rec["position_ok"] = float(g.whole_image)
            else:
                truth_pos = tuple(regions[0]["position"]) if regions and regions[0].get("position") else None
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
        elif row["task"] in ("referring_short", "referring_long", "local_desc", "global_desc"):
            regions = target_regions(target)
            rec["truth_families"] = sorted(truth_families(regions))
            rec["truth_pairs"] = sorted(f"{t}:{s}" for t, s in truth_pairs(regions))
            if row["task"] == "global_desc":
                rec["truth_positions"] = sorted({" ".join(r["position"]) for r in regions
                                                 if r.get("position") and not _is_whole(r, w, h)})
                rec["target_level"] = target.get("quality_level")
        out.append(rec)
    return out


def compute_metrics(samples: Sequence[dict], mappings: Sequence[str], mapping: str) -> dict[str, Any]:
    """Task metrics from the per-sample records of :func:`evaluate` (sections with no sample
    are left out, so every value present is defined)."""
    metrics: dict[str, Any] = {}
    rating = [s for s in samples if s["task"] == "rating" and s.get("score") is not None
              and s.get("target_score") is not None]
    if rating:
        metrics["rating"] = rating_metrics([s["score"] for s in rating], [s["target_score"] for s in rating],
                                           [s["level"] for s in rating], [s["target_level"] for s in rating])
    grounding = [s for s in samples if s["task"] == "grounding"]
    if grounding:
        section: dict[str, Any] = {}
        for sub in GROUNDING_SUBTASKS + ("all",):
            ss = [s for s in grounding if sub == "all" or s["subtask"] == sub]
            if not ss:
                continue
            d: dict[str, Any] = {"n": float(len(ss)),
                                 "point_acc": _mean([s[f"mapping.{mapping}.hit"] for s in ss]),
                                 "miou": _mean([s[f"mapping.{mapping}.iou"] for s in ss]),
                                 "position_acc": _mean([s["position_ok"] for s in ss]),
                                 "whole_image_acc": _mean([float(s["whole_image"] == s["truth_whole"]) for s in ss])}
            for which in ("mapping", "forced"):
                d[which] = {m: {"point_acc": _mean([s[f"{which}.{m}.hit"] for s in ss]),
                                "miou": _mean([s[f"{which}.{m}.iou"] for s in ss])} for m in mappings}
            section[sub] = d
        metrics["grounding"] = section
    for task in ("referring_short", "referring_long"):
        ss = [s for s in samples if s["task"] == task]
        if not ss:
            continue
        types, pairs = PRF(), PRF()
        for s in ss:
            types.add(distortion_families(s["pred"]), set(s["truth_families"]))
            pairs.add({f"{t}:{v}" for t, v in distortion_pairs(s["pred"])}, set(s["truth_pairs"]))
        metrics[task] = {"n": float(len(ss)), **types.as_dict("type_"), "pair_f1": pairs.f1,
                         "exact_match": pairs.exact / pairs.n}
    for task in ("global_desc", "local_desc"):
        ss = [s for s in samples if s["task"] == task]
        if not ss:
            continue
        types = PRF()
        for s in ss:
            types.add(distortion_families(s["pred"]), set(s["truth_families"]))
        d = {"n": float(len(ss)), **types.as_dict("type_")}
        if task == "global_desc":
            pos = PRF()
            for s in ss:
                said = {f"{v} {h}" for v, h in answer_position_words(s["pred"]) if v and h}
                pos.add(said, set(s["truth_positions"]))
            d.update(pos.as_dict("position_"))
            d["level_acc"] = _mean([float(answer_level(s["pred"]) == s["target_level"]) for s in ss])
        metrics[task] = d
    return metrics


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"grounding.hyd.point_acc": ..., ...} (finite values only)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_metrics(v, key + "."))
        elif isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


# ============================================================== outputs


def _overlay_png(item: dict, max_side: int = 256) -> str:
    from PIL import Image, ImageDraw

    img = item["image"].convert("RGB")
    arr = np.asarray(img).astype(np.float32)
    tm = item["truth_mask"]
    arr[tm] = 0.55 * arr[tm] + 0.45 * np.array([40, 220, 40])      # truth: green
    pm = item.get("mask")
    if pm is not None:
        arr[pm] = 0.6 * arr[pm] + 0.4 * np.array([230, 40, 40])    # prediction: red
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(2, round(max(out.size) / 60))
    for x, y in item["points"]:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(30, 80, 255), outline=(255, 255, 255))
    scale = min(1.0, max_side / max(out.size))
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_html(report: dict, drawn: Sequence[dict]) -> str:
    import html

    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                   for k, v in sorted(flatten_metrics(report["metrics"]).items()))
    cards = []
    for it in drawn:
        cards.append(
            f"<figure><img src='data:image/png;base64,{_overlay_png(it)}'/><figcaption>"
            f"<b>{html.escape(it['subtask'] or '')}</b> {html.escape(it['question'])}<br/>"
            f"<i>truth:</i> {html.escape(it['truth'])}<br/><i>model:</i> {html.escape(it['pred'] or '')}<br/>"
            f"hit {it['hit']:.0f}, IoU {it['iou']:.3f}</figcaption></figure>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>IQA-Spider evaluation</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}figure{display:inline-block;width:270px;"
        "vertical-align:top;margin:6px}figcaption{font-size:12px}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:2px 6px;font-size:13px}</style></head><body>"
        f"<h1>IQA-Spider evaluation</h1><p>model {html.escape(str(report['model_uri']))} "
        f"(version {html.escape(str(report['model_version']))}), data {html.escape(report['data_uri'])} "
        f"split {html.escape(report['split'])}, mapping {html.escape(report['mapping'])}, segmenter "
        f"{html.escape(report['segmenter'])}: {report['images']} images, {report['samples']} samples.</p>"
        "<p>Overlays: truth mask green, predicted mask red, predicted point blue.</p>"
        f"<h2>Metrics</h2><table>{rows}</table><h2>Grounding samples</h2>{''.join(cards)}</body></html>")


def _predictions_table(samples: Sequence[dict]):
    import pyarrow as pa

    cols = ("sample_id", "image_id", "task", "subtask", "question", "truth", "pred", "score", "target_score",
            "point_x", "point_y", "position_ok")
    rows = [{c: s.get(c) for c in cols} for s in samples]
    for r, s in zip(rows, samples):
        r["hit"] = next((v for k, v in s.items() if k.startswith("mapping.") and k.endswith(".hit")), None)
    schema = pa.schema([("sample_id", pa.string()), ("image_id", pa.string()), ("task", pa.string()),
                        ("subtask", pa.string()), ("question", pa.string()), ("truth", pa.string()),
                        ("pred", pa.string()), ("score", pa.float64()), ("target_score", pa.float64()),
                        ("point_x", pa.float64()), ("point_y", pa.float64()), ("position_ok", pa.float64()),
                        ("hit", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def _write_outputs(cfg: EvaluateConfig, report: dict, samples: Sequence[dict], drawn: Sequence[dict]) -> None:
    """report.json, predictions.parquet and report.html into a local folder, then to output.uri."""
    from iqa_spider import storage
    from iqa_spider.data.io import write_table

    local = tempfile.mkdtemp(prefix="iqa-eval-")
    report["_local_dir"] = local
    files = {"report.json": json.dumps(_jsonable(report), indent=2).encode()}
    if cfg.output.html:
        files["report.html"] = render_html(report, drawn).encode()
    for name, data in files.items():
        with open(os.path.join(local, name), "wb") as f:
            f.write(data)
    write_table(_predictions_table(samples), os.path.join(local, "predictions.parquet"))
    if cfg.output.uri:
        for name in sorted(os.listdir(local)):
            with open(os.path.join(local, name), "rb") as f:
                storage.write_bytes(storage.join(cfg.output.uri, name), f.read())
        report["output_uri"] = cfg.output.uri


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def mlflow_enabled(cfg: EvaluateConfig) -> bool:
    if cfg.mlflow.enabled == "true":
        return True
    return cfg.mlflow.enabled == "auto" and bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _log_mlflow(cfg: EvaluateConfig, report: dict) -> None:
    if not mlflow_enabled(cfg):
        return
    import mlflow

    nested = mlflow.active_run() is not None
    if not nested:
        mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run(run_name=cfg.mlflow.run_name, nested=nested) as run:
        mlflow.log_params({"model_uri": report["model_uri"], "model_version": report["model_version"],
                           "data_uri": report["data_uri"], "split": report["split"], "mapping": report["mapping"],
                           "tau": report["tau"], "segmenter": report["segmenter"]})
        mlflow.log_metrics(flatten_metrics(report["metrics"]))
        mlflow.log_metrics({"eval.images": float(report["images"]), "eval.samples": float(report["samples"])})
        if report.get("_local_dir"):
            mlflow.log_artifacts(report["_local_dir"], artifact_path="evaluation")
        report["mlflow_run_id"] = run.info.run_id


def format_metrics(metrics: dict) -> str:
    flat = flatten_metrics(metrics)
    width = max((len(k) for k in flat), default=10)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(flat.items()))


def run_evaluate(cfg: EvaluateConfig) -> dict:
    report = evaluate(cfg)
    print(f"evaluated {report['model_uri']} (version {report['model_version']}) on {report['data_uri']} "
          f"[{report['split']}]: {report['images']} images, {report['samples']} samples, {report['seconds']} s")
    print(format_metrics(report["metrics"]))
    if report.get("output_uri"):
        print(f"report: {report['output_uri']}")
    if report.get("mlflow_run_id"):
        print(f"mlflow run: {report['mlflow_run_id']}")
    return report


def main(argv=None) -> int:
    from iqa_spider.entrypoint import run_job

    return run_job(EvaluateConfig, run_evaluate, argv,
                   description="evaluate: a model (+ segmenter) on a dataset's test split")


__all__ = ["evaluate", "run_evaluate", "main", "compute_metrics", "flatten_metrics", "srcc", "plcc", "logistic4",
           "iou", "point_in_mask", "distortion_families", "distortion_pairs", "answer_level", "PRF",
           "target_mask", "grounding_sample_metrics", "rating_metrics", "render_html"]
