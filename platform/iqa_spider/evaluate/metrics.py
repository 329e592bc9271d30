"""Evaluation metrics: pure functions of predictions and truth (no model, no I/O).

Per task, with no external judge (the dataset's ``target`` column holds the truth):

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
  against the target region's distortions, ``type_acc`` (the set of families named equals
  the region's set; a clean region's set is empty), (type, severity) pair F1, exact match.
- **global_desc / local_desc**: distortion-type precision / recall / F1, position agreement
  (precision / recall / F1 of the "vertical horizontal" mentions against the distorted
  regions' positions; global only, over the samples that have such a position: a clean
  image or a whole-image distortion has none and is left out, ``position_excluded`` counts
  them), and level accuracy (the level word of the last sentence against ``quality_level``;
  global only: a local description's level has no truth column).
- **by stratum of the truth** (referring and descriptions): the type figure again per
  :data:`STRATA` (clean; whole-image or local damage, strong or weak), in ``by_stratum``.

Also the parsing of answers (distortion types and pairs, level word), the truth read from a
sample's ``target`` (regions, union mask, distortion sets), :func:`compute_metrics` over the
per-sample records of :func:`iqa_spider.evaluate.job.evaluate`, and :func:`flatten_metrics`.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from iqa_spider.data import rle
from iqa_spider.infer.text_to_point import answer_position_words
from iqa_spider.vocab import DISTORTION_TERMS, LEVEL_WORDS, SEVERITY_WORDS

_TERM_TO_FAMILY = {term: fam for fam, term in DISTORTION_TERMS.items()}
_SEVERITY_OF = {w: k for k, w in SEVERITY_WORDS.items()}
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
GROUNDING_SUBTASKS = ("hyd", "sid", "dao")

# ============================================================== scores and masks


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


# ============================================================== parsing answers


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
            m = rle.decode(r["mask_rle"])
            if m.shape == mask.shape:
                mask |= m
    return mask


def is_whole_region(region: dict, width: int, height: int) -> bool:
    """Whether a region's mask covers the whole image."""

    return region.get("mask_rle") is not None and rle.area(region["mask_rle"]) == width * height


def truth_families(regions: Iterable[dict]) -> set[str]:
    return {d["type"] for r in regions for d in (r.get("distortions") or [])}


def truth_pairs(regions: Iterable[dict]) -> set[tuple[str, int]]:
    return {(d["type"], int(d["severity"])) for r in regions for d in (r.get("distortions") or [])}


# A small model trained from scratch names strong damage over the whole image long before weak
# or local damage (BENCHMARKS.md, "Quality"), and a split-wide figure averages the two away. So
# the referring and description metrics are also given per stratum of the truth.
STRATA = ("clean", "whole_strong", "whole_weak", "local_strong", "local_weak")
STRONG_SEVERITY = 4   # severities 4-5 of 1-5


def truth_stratum(regions: Sequence[dict], width: int, height: int) -> str:
    """``clean``, or ``<whole|local>_<strong|weak>``: whole when a distorted region covers the
    image, strong when the worst severity is at least STRONG_SEVERITY."""
    damaged = [r for r in regions if r.get("distortions")]
    if not damaged:
        return "clean"
    extent = "whole" if any(is_whole_region(r, width, height) for r in damaged) else "local"
    worst = max(int(d["severity"]) for r in damaged for d in r["distortions"])
    return f"{extent}_{'strong' if worst >= STRONG_SEVERITY else 'weak'}"


def by_stratum(samples: Sequence[dict], section) -> dict[str, dict]:
    """``section(subset)`` for each stratum present, with its ``n`` (samples without a
    ``truth_stratum``, from older records, are left out)."""
    out: dict[str, dict] = {}
    for name in STRATA:
        ss = [s for s in samples if s.get("truth_stratum") == name]
        if ss:
            out[name] = {"n": float(len(ss)), **section(ss)}
    return out


# ============================================================== per sample and per task


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


def compute_metrics(samples: Sequence[dict], mappings: Sequence[str], mapping: str) -> dict[str, Any]:
    """Task metrics from the per-sample records of :func:`iqa_spider.evaluate.job.evaluate` (sections with no sample
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
        types, pairs = _type_prf(ss), PRF()
        for s in ss:
            pairs.add({f"{t}:{v}" for t, v in distortion_pairs(s["pred"])}, set(s["truth_pairs"]))
        metrics[task] = {"n": float(len(ss)), **types.as_dict("type_"), "type_acc": types.exact / types.n,
                         "pair_f1": pairs.f1, "exact_match": pairs.exact / pairs.n}
        if strata := by_stratum(ss, lambda sub: {"type_acc": (t := _type_prf(sub)).exact / t.n}):
            metrics[task]["by_stratum"] = strata
    for task in ("global_desc", "local_desc"):
        ss = [s for s in samples if s["task"] == task]
        if not ss:
            continue
        d = {"n": float(len(ss)), **_type_prf(ss).as_dict("type_")}
        if strata := by_stratum(ss, lambda sub: {"type_f1": _type_prf(sub).f1}):
            d["by_stratum"] = strata
        if task == "global_desc":
            pos = PRF()
            with_pos = [s for s in ss if s["truth_positions"]]
            for s in with_pos:
                said = {f"{v} {h}" for v, h in answer_position_words(s["pred"]) if v and h}
                pos.add(said, set(s["truth_positions"]))
            if with_pos:   # none: position F1 is undefined, not perfect
                d.update(pos.as_dict("position_"))
            d["position_n"], d["position_excluded"] = float(len(with_pos)), float(len(ss) - len(with_pos))
            d["level_acc"] = _mean([float(answer_level(s["pred"]) == s["target_level"]) for s in ss])
        metrics[task] = d
    return metrics


def _type_prf(samples: Sequence[dict]) -> PRF:
    """The families each answer names against its truth's."""
    types = PRF()
    for s in samples:
        types.add(distortion_families(s["pred"]), set(s["truth_families"]))
    return types


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
