"""Chance baselines: what an answer that ignores the image scores on the same truth.

Computed from the evaluated samples' truth (the split as evaluated: after ``data.tasks``,
``data.max_images`` and skipped images), each the best *constant* answer or a random one, so
that ``report.json`` can put ``chance.<key>`` next to ``metrics.<key>``. The majorities are
taken from that same truth (an upper bound on what a constant answer could know in advance):

- ``rating``: ``srcc`` and ``plcc`` 0 (a score independent of the image); ``level_acc`` of
  always answering the most frequent truth level.
- ``grounding.<sub>`` (and ``mapping.<name>`` / ``forced.<name>``, the same figures):
  ``point_acc`` of a uniform random point = the mean fraction of the image the truth mask
  covers (1 for a whole-image truth); ``miou`` of always answering the whole image = that same
  mean fraction; ``position_acc`` of always naming the most frequent truth position ("top
  left", ..., or "whole image"; 0.25 on a balanced 2x2 split); ``whole_image_acc`` of the
  majority of whole / not whole.
- ``referring_short`` / ``referring_long``: per region the question names (the whole image,
  or a position), ``type_acc`` of always answering that region's most frequent truth family
  *set* (a single family where regions carry one distortion, "none" for a clean region) and
  ``type_precision`` / ``type_recall`` / ``type_f1`` of always naming the family most of its
  samples' truth contains. The question is part of what an answer that ignores the image
  sees: only whole-image damage is asked about as "the whole image", and a quadrant only on a
  clean or locally damaged image (on data with no local damage, always a clean one).
- ``global_desc`` / ``local_desc``: type precision / recall / F1 of always naming that
  majority family; ``global_desc.level_acc`` of the majority level; ``global_desc.position_*``
  of always naming the most frequent truth position (over the samples that have one).
- ``<task>.by_stratum.<stratum>`` (:data:`iqa_spider.evaluate.metrics.STRATA`): the same
  ``type_acc`` (referring) or ``type_f1`` (descriptions), of that stratum's own majority (no
  ``n``: the sample counts are the metrics').

``chance_basis`` says, per flattened key, which answer the figure is for.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from iqa_spider.evaluate.metrics import GROUNDING_SUBTASKS, PRF, by_stratum
from iqa_spider.infer.text_to_point import answer_position_words


def _majority(values: Sequence) -> tuple[Any, float]:
    """(most frequent value, its share); ties go to the smallest value by repr, so the pick is stable."""
    counts = Counter(values)
    if not counts:
        return None, float("nan")
    best = min(counts.items(), key=lambda kv: (-kv[1], repr(kv[0])))
    return best[0], best[1] / len(values)


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _family_set_name(families: Sequence[str]) -> str:
    return "+".join(sorted(families)) or "none"


def _constant_prf(name: str, truth_sets: Sequence[set], answer: str | None) -> dict[str, float]:
    prf = PRF()
    for t in truth_sets:
        prf.add({answer} if answer else set(), t)
    return prf.as_dict(name)


def question_region(sample: dict) -> str:
    """The region a referring question names ("whole image" when it names no position). An
    answer that ignores the image can still read it: only whole-image damage is asked about as
    the whole image, so a quadrant question is about a clean or locally damaged image."""
    said = answer_position_words(sample.get("question") or "")
    return " ".join(w for pair in said for w in pair if w) or "whole image"


def _referring_chance(ss: Sequence[dict]) -> tuple[dict[str, float], tuple[str, str]]:
    """Type P/R/F1 and type_acc of the constant answers per region the question names, and
    what those answers are (for chance_basis)."""
    groups: dict[str, list[dict]] = {}
    for s in ss:
        groups.setdefault(question_region(s), []).append(s)
    prf, right, fams, fsets = PRF(), 0.0, [], []
    for region, g in sorted(groups.items()):
        truth_sets = [set(s["truth_families"]) for s in g]
        fam, _ = _majority([f for t in truth_sets for f in t])
        for t in truth_sets:
            prf.add({fam} if fam else set(), t)
        fset, share = _majority([_family_set_name(s["truth_families"]) for s in g])
        right += share * len(g)
        fams.append(f"{region}: {fam!r}" if fam else f"{region}: no distortion")
        fsets.append(f"{region}: {fset!r}")
    return {**prf.as_dict("type_"), "type_acc": right / len(ss)}, ("; ".join(fams), "; ".join(fsets))


def _majority_family_prf(ss: Sequence[dict]) -> tuple[dict[str, float], str | None]:
    """Type P/R/F1 of always naming the family most samples' truth contains, and that family."""
    truth_sets = [set(s["truth_families"]) for s in ss]
    fam, _ = _majority([f for t in truth_sets for f in t])
    return _constant_prf("type_", truth_sets, fam), fam


# Per stratum of the truth, the constant answer is that stratum's own majority (the same upper
# bound as above: a constant answer that knew each stratum's truth in advance). The counts are
# the metrics' own, so the chance sections carry none.
def _chance_by_stratum(ss: Sequence[dict], section) -> dict[str, dict]:
    return {name: {k: v for k, v in d.items() if k != "n"} for name, d in by_stratum(ss, section).items()}


def _stratum_basis(task: str, strata: dict[str, dict]) -> dict[str, str]:
    return {f"{task}.by_stratum.{name}.{key}": "the same constant answer, with this stratum's own majority"
            for name, d in strata.items() for key in d}


def chance_baselines(samples: Sequence[dict], mappings: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(``chance``, ``chance_basis``): the nested baselines, keyed as the metrics are, and a
    description of each flattened key's baseline."""
    chance: dict[str, Any] = {}
    basis: dict[str, str] = {}

    rating = [s for s in samples if s["task"] == "rating" and s.get("score") is not None
              and s.get("target_score") is not None]
    if rating:
        level, share = _majority([s["target_level"] for s in rating if s.get("target_level")])
        chance["rating"] = {"srcc": 0.0, "plcc": 0.0, "level_acc": share}
        basis["rating.srcc"] = basis["rating.plcc"] = "a score independent of the image: 0"
        basis["rating.level_acc"] = f"always {level!r}, the most frequent truth level"

    grounding = [s for s in samples if s["task"] == "grounding"]
    section: dict[str, Any] = {}
    for sub in GROUNDING_SUBTASKS + ("all",):
        ss = [s for s in grounding if sub == "all" or s["subtask"] == sub]
        if not ss:
            continue
        cover = _mean([s["truth_area_frac"] for s in ss])
        pos, _ = _majority([s["truth_position"] for s in ss if s.get("truth_position")])
        pos_acc = sum(s.get("truth_position") == pos for s in ss) / len(ss) if pos is not None else 0.0
        whole_share = _mean([float(s["truth_whole"]) for s in ss])
        pm = {"point_acc": cover, "miou": cover}
        section[sub] = {**pm, "position_acc": pos_acc,
                        "whole_image_acc": max(whole_share, 1.0 - whole_share),
                        "mapping": {m: dict(pm) for m in mappings}, "forced": {m: dict(pm) for m in mappings}}
        basis[f"grounding.{sub}.point_acc"] = "a uniform random point: the mean fraction of the image the truth covers"
        basis[f"grounding.{sub}.miou"] = "always the whole-image mask: the mean fraction of the image the truth covers"
        basis[f"grounding.{sub}.position_acc"] = f"always {pos!r}, the most frequent truth position"
        basis[f"grounding.{sub}.whole_image_acc"] = ("always 'the whole image'" if whole_share > 0.5
                                                     else "never 'the whole image'")
    if section:
        chance["grounding"] = section

    for task in ("referring_short", "referring_long", "global_desc", "local_desc"):
        ss = [s for s in samples if s["task"] == task]
        if not ss:
            continue
        if task.startswith("referring"):
            d, (families, family_sets) = _referring_chance(ss)
            basis[f"{task}.type_f1"] = f"per region the question names, always its most frequent family: {families}"
            basis[f"{task}.type_acc"] = f"per region the question names, always its most frequent family set: {family_sets}"
            if strata := _chance_by_stratum(ss, lambda sub: {"type_acc": _referring_chance(sub)[0]["type_acc"]}):
                d["by_stratum"] = strata
                basis.update(_stratum_basis(task, strata))
            chance[task] = d
            continue
        d, fam = _majority_family_prf(ss)
        basis[f"{task}.type_f1"] = (f"always naming {fam!r}, the family most samples' truth contains" if fam
                                    else "always naming no distortion (no sample's truth has one)")
        if strata := _chance_by_stratum(ss, lambda sub: {"type_f1": _majority_family_prf(sub)[0]["type_f1"]}):
            d["by_stratum"] = strata
            basis.update(_stratum_basis(task, strata))
        if task == "global_desc":
            level, share = _majority([s.get("target_level") for s in ss])
            d["level_acc"] = share
            basis["global_desc.level_acc"] = f"always {level!r}, the most frequent truth level"
            with_pos = [set(s["truth_positions"]) for s in ss if s["truth_positions"]]
            if with_pos:
                p, _ = _majority([q for t in with_pos for q in t])
                d.update(_constant_prf("position_", with_pos, p))
                basis["global_desc.position_f1"] = f"always naming {p!r}, the most frequent truth position"
        chance[task] = d
    return chance, basis
