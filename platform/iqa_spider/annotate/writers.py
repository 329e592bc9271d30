"""Question/answer writers for every task, all derived from a `Truth`.

Each writer returns `Sample`s: the conversation turn plus which regions it is about. The
pipeline turns them into dataset rows whose `target` is built from the same truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from iqa_spider.annotate import templates as T
from iqa_spider.annotate.distortions import Distortion
from iqa_spider.annotate.truth import Region, Truth, target_struct
from iqa_spider.data.schema import SCHEMA_VERSION, sample_id
from iqa_spider.vocab import DISTORTION_TERMS, SCORE_ANSWER_PREFIX, SCORE_QUESTION, SEVERITY_WORDS


@dataclass
class Sample:
    task: str
    subtask: str | None
    question: str
    answer: str
    target_ids: list[str]
    whole_image: bool = False


def region_phrase(region: Region) -> str:
    """How text names a region: its label where known, else by its position words."""
    if region.is_whole_image:
        return "the whole image"
    vertical, horizontal = region.position
    if region.label:
        return f"the {region.label} in the {vertical} {horizontal} of the image"
    return f"the {vertical} {horizontal} region of the image"


def term(d: Distortion | str) -> str:
    return DISTORTION_TERMS[d if isinstance(d, str) else d.type]


def short_list(region: Region) -> str:
    """'Mild blur, moderate brightening.' (referring, short)."""
    if not region.distortions:
        return "No visible distortion."
    parts = [f"{SEVERITY_WORDS[d.severity]} {term(d)}" for d in region.distortions]
    text = ", ".join(parts)
    return text[0].upper() + text[1:] + "."


def long_list(region: Region) -> str:
    """Short list plus the visual effect of each distortion (referring, long)."""
    if not region.distortions:
        return "No visible distortion; the details and colours of this region look natural."
    parts = [f"{SEVERITY_WORDS[d.severity]} {term(d)}, {T.EFFECTS[d.type]}" for d in region.distortions]
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def _pick(rng: np.random.Generator, pool: tuple[str, ...]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _distortion_sentences(rng: np.random.Generator, region: Region) -> list[str]:
    name = region_phrase(region)
    out = []
    for d in region.distortions:
        sev = SEVERITY_WORDS[d.severity]
        out.append(_pick(rng, T.DISTORTION_SENTENCES).format(
            Severity=sev.capitalize(), severity=sev, term=term(d), region=name,
            region_cap=name[0].upper() + name[1:], effect=T.EFFECTS[d.type]))
    return out


def global_description(rng: np.random.Generator, truth: Truth) -> Sample:
    if truth.distorted:
        body = [s for r in truth.distorted for s in _distortion_sentences(rng, r)]
        clean = [r for r in truth.regions if not r.distortions and not r.is_whole_image]
        if clean and len(clean) < len(truth.regions):
            body.append("The rest of the image is free of visible distortion.")
    else:
        body = [_pick(rng, T.GLOBAL_OPENINGS_CLEAN)]
    answer = " ".join(body + [_pick(rng, T.CLOSINGS).format(level=truth.quality_level())])
    return Sample("global_desc", None, _pick(rng, T.GLOBAL_QUESTIONS), answer,
                  [r.region_id for r in truth.distorted])


def local_description(rng: np.random.Generator, truth: Truth, region: Region) -> Sample:
    question = _pick(rng, T.LOCAL_QUESTIONS).format(region=region_phrase(region))
    if region.distortions:
        body = _distortion_sentences(rng, region)
    else:
        body = [f"{region_phrase(region).capitalize()} shows no visible distortion; its details are clear."]
    local_level = Truth([region], truth.width, truth.height).quality_level() if region.distortions else "excellent"
    answer = " ".join(body + [f"The quality of this region is {local_level}."])
    return Sample("local_desc", None, question, answer, [region.region_id])


def _ground_answer(rng: np.random.Generator, what: str, region: Region) -> str:
    text = _pick(rng, T.GROUND_ANSWERS).format(what=what, region=region_phrase(region))
    return text[0].upper() + text[1:]


def _whole_image_answer(rng: np.random.Generator, region: Region) -> str:
    names = ", ".join(f"{SEVERITY_WORDS[d.severity]} {term(d)}" for d in region.distortions)
    return _pick(rng, T.WHOLE_IMAGE_ANSWERS).format(distortions=names)


def grounding_hyd(rng: np.random.Generator, truth: Truth) -> Sample | None:
    worst = truth.most_degraded()
    if worst is None:
        return None
    question = _pick(rng, T.HYD_QUESTIONS)
    if worst.is_whole_image:
        return Sample("grounding", "hyd", question, _whole_image_answer(rng, worst), [worst.region_id], True)
    return Sample("grounding", "hyd", question, _ground_answer(rng, "most degraded region", worst),
                  [worst.region_id])


def grounding_sid(rng: np.random.Generator, truth: Truth, family: str) -> Sample | None:
    """The region with the most severe distortion of one family (ties: the larger area)."""
    having = [(max(d.severity for d in r.distortions if d.type == family), r.area_fraction, r)
              for r in truth.distorted if any(d.type == family for d in r.distortions)]
    if not having:
        return None
    _, _, region = max(having, key=lambda t: (t[0], t[1]))
    question = _pick(rng, T.SID_QUESTIONS).format(distortion=term(family))
    if region.is_whole_image:
        return Sample("grounding", "sid", question, _whole_image_answer(rng, region), [region.region_id], True)
    what = f"region with the most severe {term(family)}"
    return Sample("grounding", "sid", question, _ground_answer(rng, what, region), [region.region_id])


def grounding_dao(rng: np.random.Generator, truth: Truth, region: Region) -> Sample | None:
    """About the order in which two distortions accumulated in a region."""
    if len(region.distortions) < 2:
        return None
    first, second = region.distortions[0], region.distortions[1]
    question = _pick(rng, T.DAO_QUESTIONS).format(first=term(first), second=term(second))
    if region.is_whole_image:
        return Sample("grounding", "dao", question, _whole_image_answer(rng, region), [region.region_id], True)
    what = f"region with {term(first)} added before {term(second)}"
    return Sample("grounding", "dao", question, _ground_answer(rng, what, region), [region.region_id])


def referring(rng: np.random.Generator, region: Region, long: bool) -> Sample:
    question = _pick(rng, T.REFER_LONG_QUESTIONS if long else T.REFER_QUESTIONS).format(region=region_phrase(region))
    answer = long_list(region) if long else short_list(region)
    return Sample("referring_long" if long else "referring_short", None, question, answer, [region.region_id])


def rating(truth: Truth) -> Sample:
    return Sample("rating", None, SCORE_QUESTION, f"{SCORE_ANSWER_PREFIX} {truth.quality_level()}.", [])


def write_all(rng: np.random.Generator, truth: Truth, local_per_image: int = 2,
              referring_per_image: int = 2) -> list[Sample]:
    """Every task for one distorted image: the four-task mix plus rating."""
    samples: list[Sample] = [global_description(rng, truth), rating(truth)]
    named = [r for r in truth.regions if not r.is_whole_image] or truth.regions
    # Local description and referring: distorted regions first, then clean ones as negatives.
    ordered = truth.distorted + [r for r in named if not r.distortions]
    ordered = [r for r in ordered if not r.is_whole_image] or ordered
    for region in ordered[:local_per_image]:
        samples.append(local_description(rng, truth, region))
    for i, region in enumerate(ordered[:referring_per_image]):
        samples.append(referring(rng, region, long=bool(i % 2)))
    hyd = grounding_hyd(rng, truth)
    if hyd:
        samples.append(hyd)
    families = sorted({d.type for r in truth.distorted for d in r.distortions})
    if families:
        sid = grounding_sid(rng, truth, families[int(rng.integers(len(families)))])
        if sid:
            samples.append(sid)
    for region in truth.distorted:
        dao = grounding_dao(rng, truth, region)
        if dao:
            samples.append(dao)
    return samples


def sample_rows(iid: str, truth: Truth, samples: list[Sample], *, image: bytes | None, image_uri: str | None,
                source_uri: str, split: str) -> list[dict]:
    """Dataset rows (the contract's columns) of one image's samples, each with the target its
    answer was written from; the image is embedded (`image`) or referenced (`image_uri`)."""
    return [{
        "sample_id": sample_id(iid, s.task, s.question, s.answer), "image_id": iid,
        "image": image, "image_uri": image_uri,
        "width": truth.width, "height": truth.height, "task": s.task, "subtask": s.subtask,
        "question": s.question, "answer": s.answer,
        "target": target_struct(truth, s.target_ids, s.whole_image),
        "source_uri": source_uri, "split": split, "schema_version": SCHEMA_VERSION,
    } for s in samples]
