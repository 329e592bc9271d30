"""The promotion gate: a candidate's metrics against the champion's, the floors and chance.

`evaluate_version` runs the evaluation harness on one registered version; `check_gate` turns
two metric sets into one `Check` per gate metric (direction, tolerance against the champion,
absolute floor, margin over chance), plus a check that both saw the same samples.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from iqa_spider.registry.config import GateMetric, PromoteConfig
from iqa_spider.registry.lock import PromotionError
from iqa_spider.tracking import tracking_uri

log = logging.getLogger(__name__)

SAMPLES = "evaluated_samples"  # how many samples an evaluation scored: equal for candidate and champion
CHANCE = "chance."  # prefix of the chance figures evaluate_version adds beside the metrics


@dataclass
class Check:
    metric: str
    direction: str
    tolerance: float
    floor: float | None
    candidate: float | None
    champion: float | None
    passed: bool
    reason: str


def is_finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def check_gate(gate: Sequence[GateMetric], candidate: dict[str, float],
               champion: dict[str, float] | None) -> list[Check]:
    """One :class:`Check` per gate metric. ``champion`` None: no champion (floors decide)."""
    checks = []
    for g in gate:
        c = candidate.get(g.name)
        ch = champion.get(g.name) if champion is not None else None
        sign = 1.0 if g.direction == "higher" else -1.0
        if not is_finite(c):
            passed, reason = False, f"{g.name}: candidate value {c} is missing or not finite"
        elif g.floor is not None and sign * (c - g.floor) < 0:
            passed, reason = False, f"{g.name}: candidate {c:.4f} is past the floor {g.floor} ({g.direction} is better)"
        elif g.above_chance is not None and not is_finite(candidate.get(CHANCE + g.name)):
            passed, reason = False, f"{g.name}: the evaluation reported no chance figure to beat"
        elif g.above_chance is not None and c < candidate[CHANCE + g.name] + g.above_chance:
            passed, reason = False, (f"{g.name}: candidate {c:.4f} does not beat chance "
                                     f"{candidate[CHANCE + g.name]:.4f} by {g.above_chance}")
        elif champion is None:
            met = [f"meets the floor {g.floor}"] if g.floor is not None else []
            if g.above_chance is not None:
                met.append(f"beats chance {candidate[CHANCE + g.name]:.4f} by at least {g.above_chance}")
            passed, reason = True, f"{g.name}: candidate {c:.4f} {' and '.join(met) or 'no floor set'} (no champion)"
        elif not is_finite(ch):
            passed, reason = True, f"{g.name}: champion value {ch} is not finite, nothing to compare against"
        elif sign * (c - ch) < -g.tolerance:
            passed, reason = False, (f"{g.name}: candidate {c:.4f} is worse than champion {ch:.4f} by more than "
                                     f"the tolerance {g.tolerance} ({g.direction} is better)")
        else:
            passed, reason = True, f"{g.name}: candidate {c:.4f} vs champion {ch:.4f} within tolerance {g.tolerance}"
        checks.append(Check(g.name, g.direction, g.tolerance, g.floor, c, ch, passed, reason))
    c_n, ch_n = candidate.get(SAMPLES), champion.get(SAMPLES) if champion is not None else None
    if c_n is not None and ch_n is not None:  # a sample unreadable for one run only: not comparable
        same = c_n == ch_n
        checks.append(Check(SAMPLES, "equal", 0.0, None, c_n, ch_n, same,
                            f"{SAMPLES}: both evaluated on {c_n:g} samples" if same else
                            f"{SAMPLES}: candidate evaluated on {c_n:g} samples, champion on {ch_n:g}; "
                            "the metrics are not comparable (an image was unreadable for one run)"))
    return checks


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def evaluate_version(cfg: PromoteConfig, version: str, data_uri: str) -> dict[str, float]:
    """The harness (:func:`iqa_spider.evaluate.job.evaluate`) on one registered version ->
    flattened metrics."""
    # here, not at the top: listing versions and rolling back need no evaluation code
    from iqa_spider.evaluate.config import EvalMlflow, EvalOutput, EvaluateConfig
    from iqa_spider.evaluate.job import evaluate
    from iqa_spider.evaluate.metrics import flatten_metrics

    # The version is read from the server the gate decides on, whatever MLFLOW_TRACKING_URI says.
    model = replace(cfg.model, path=model_uri(cfg.registered_model, version),
                    tracking_uri=cfg.model.tracking_uri or tracking_uri(cfg.tracking.uri))
    ecfg = EvaluateConfig(model=model,
                          infer=cfg.infer, segmenter=cfg.segmenter, data=replace(cfg.data, uri=data_uri),
                          output=EvalOutput(uri=None, html=False), mlflow=EvalMlflow(enabled="false"),
                          mappings=list(cfg.mappings))
    report = evaluate(ecfg)
    if str(report["model_version"]) != str(version):
        raise PromotionError(f"evaluated version {report['model_version']}, expected {version}")
    log.info("evaluated %s version %s: %d images, %d samples", cfg.registered_model, version,
             report["images"], report["samples"])
    metrics = flatten_metrics(report["metrics"])
    # The chance figures of the same samples, for gate metrics with above_chance.
    metrics.update({CHANCE + k: v for k, v in flatten_metrics(report.get("chance") or {}).items()})
    metrics[SAMPLES] = float(report["samples"])  # check_gate compares only like with like
    return metrics


__all__ = ["Check", "check_gate", "evaluate_version", "model_uri", "is_finite", "SAMPLES", "CHANCE"]
