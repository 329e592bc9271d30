"""Writers and the quality rule: every answer is derived from, and consistent with, the truth."""
import re

import numpy as np
import pytest

from iqa_spider.annotate import templates
from iqa_spider.annotate.distortions import Distortion
from iqa_spider.annotate.rewrite import keeps_truth, truth_words
from iqa_spider.annotate.truth import Region, Truth, level_for_score, score_from_damages
from iqa_spider.annotate.writers import write_all
from iqa_spider.vocab import DISTORTION_TERMS, LEVEL_WORDS, SEVERITY_WORDS, position_words


def mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def truth_two_regions():
    """Two distorted regions that share a family (noise), so the SiD-G target is a choice."""
    h, w = 60, 80
    sky = Region("r0", mask(h, w, 0, 20, 0, 40), "sky", [Distortion("blur", "gaussian", 4),
                                                         Distortion("noise", "gaussian", 1)])
    car = Region("r1", mask(h, w, 40, 60, 50, 80), None,
                 [Distortion("compression", "jpeg", 2), Distortion("noise", "gaussian", 3)])
    rest = Region("r2", ~(sky.mask | car.mask), None, [])
    return Truth([sky, car, rest], w, h)


def named_family(question: str) -> str:
    """The one distortion family a SiD-G question names."""
    (family,) = [f for f, t in DISTORTION_TERMS.items() if re.search(rf"\b{re.escape(t)}\b", question)]
    return family


def most_severe(truth: Truth, family: str) -> Region:
    """The documented SiD-G rule, written out: the region with the most severe instance of the
    family; a tie goes to the larger region."""
    best = None
    for r in truth.distorted:
        sev = [d.severity for d in r.distortions if d.type == family]
        if sev and (best is None or (max(sev), r.area_fraction) > best[0]):
            best = ((max(sev), r.area_fraction), r)
    return best[1]


def test_global_pool_has_26_questions():
    assert len(set(templates.GLOBAL_QUESTIONS)) == 26


def test_quality_rule():
    assert score_from_damages([]) == 5.0 and level_for_score(5.0) == "excellent"
    assert level_for_score(1.0) == "bad"
    def whole(severity):
        return Truth([Region("w", np.ones((4, 4), bool), None, [Distortion("noise", "gaussian", severity)])], 4, 4)

    scores = [whole(s).quality_score() for s in range(1, 6)]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 1.0
    # the same severity on a larger area is worse
    small = Truth([Region("a", mask(10, 10, 0, 2, 0, 2), None, [Distortion("blur", "gaussian", 3)])], 10, 10)
    big = Truth([Region("a", mask(10, 10, 0, 8, 0, 8), None, [Distortion("blur", "gaussian", 3)])], 10, 10)
    assert big.quality_score() < small.quality_score()


SEEDS = range(10)


@pytest.mark.parametrize("seed", SEEDS)
def test_answers_agree_with_the_truth(seed):
    truth = truth_two_regions()
    samples = write_all(np.random.default_rng(seed), truth)
    tasks = {s.task for s in samples}
    assert {"global_desc", "local_desc", "grounding", "referring_short", "referring_long", "rating"} <= tasks
    level = truth.quality_level()
    by_id = {r.region_id: r for r in truth.regions}
    grounding = [s for s in samples if s.task == "grounding"]
    # every image with distortions gets one HyD-G, one SiD-G and one DAO-G per two-step region
    assert sorted(s.subtask for s in grounding) == ["dao", "dao", "hyd", "sid"]
    for s in samples:
        if s.task == "global_desc":
            assert s.answer.endswith(f"Overall, the quality of the image is {level}.")
            for r in truth.distorted:
                for d in r.distortions:
                    assert f"{SEVERITY_WORDS[d.severity]} {DISTORTION_TERMS[d.type]}" in s.answer.lower()
        if s.task == "rating":
            assert s.answer == f"The quality of the image is {level}."
        if s.task == "grounding":
            (rid,) = s.target_ids
            region = by_id[rid]
            assert not s.whole_image
            v, hword = position_words(region.bbox)
            assert f"{v} {hword}" in s.answer, (s.answer, region.bbox)
            if s.subtask == "hyd":
                assert region is truth.most_degraded()
            elif s.subtask == "sid":
                family = named_family(s.question)
                assert region is most_severe(truth, family), (s.question, rid)
            else:
                assert s.subtask == "dao"
                first, second = (DISTORTION_TERMS[d.type] for d in region.distortions[:2])
                assert s.question.index(first) < s.question.index(second), s.question
        if s.task.startswith("referring"):
            (rid,) = s.target_ids
            words = truth_words(s.answer)
            expected = {DISTORTION_TERMS[d.type] for d in by_id[rid].distortions}
            assert {w for w in words if w in DISTORTION_TERMS.values()} == expected
            # the long task asks for the effects its answers give; the short one for names only
            pool = templates.REFER_LONG_QUESTIONS if s.task == "referring_long" else templates.REFER_QUESTIONS
            assert any(re.fullmatch(re.escape(q).replace(re.escape("{region}"), ".+"), s.question)
                       for q in pool), (s.task, s.question)


def test_every_grounding_subtask_and_sid_family_occurs_across_the_seeds():
    """The seeds above cover HyD-G, SiD-G and DAO-G, both DAO-G regions, and SiD-G questions
    about the shared family (noise, where the rule has to choose) and another one."""
    truth = truth_two_regions()
    subtasks, dao_targets, sid_families = set(), set(), set()
    for seed in SEEDS:
        for s in write_all(np.random.default_rng(seed), truth):
            if s.task == "grounding":
                subtasks.add(s.subtask)
                if s.subtask == "dao":
                    dao_targets.update(s.target_ids)
                if s.subtask == "sid":
                    sid_families.add(named_family(s.question))
    assert subtasks == {"hyd", "sid", "dao"}
    assert dao_targets == {"r0", "r1"}
    assert "noise" in sid_families and len(sid_families) >= 2, sid_families


def test_sid_target_is_the_most_severe_instance_and_a_tie_goes_to_the_larger_region():
    from iqa_spider.annotate.writers import grounding_sid

    h, w = 40, 40
    big_mild = Region("big", mask(h, w, 0, 30, 0, 30), None, [Distortion("noise", "gaussian", 2)])
    small_severe = Region("small", mask(h, w, 32, 40, 32, 40), None,
                          [Distortion("blur", "gaussian", 1), Distortion("noise", "gaussian", 5)])
    truth = Truth([big_mild, small_severe], w, h)
    # HyD-G would pick the big region (more damage); SiD-G on noise must pick the severe one
    assert truth.most_degraded() is big_mild
    for seed in range(3):
        s = grounding_sid(np.random.default_rng(seed), truth, "noise")
        assert s.subtask == "sid" and s.target_ids == ["small"] and "bottom right" in s.answer
        assert DISTORTION_TERMS["noise"] in s.question
    assert grounding_sid(np.random.default_rng(0), truth, "blur").target_ids == ["small"]
    assert grounding_sid(np.random.default_rng(0), truth, "pixelate") is None  # no such family here
    tie = Truth([Region("a", mask(h, w, 0, 10, 0, 10), None, [Distortion("noise", "gaussian", 3)]),
                 Region("b", mask(h, w, 20, 40, 0, 40), None, [Distortion("noise", "gaussian", 3)])], w, h)
    assert grounding_sid(np.random.default_rng(0), tie, "noise").target_ids == ["b"]


def test_position_words_name_the_cell_holding_most_of_the_region():
    """A free-form region is named by where most of it is, not by its bbox centre."""
    h = w = 100
    blob = mask(h, w, 0, 60, 0, 60) | mask(h, w, 95, 100, 0, 100)  # a top-left blob and a thin strip along the bottom
    region = Region("r0", blob, None, [Distortion("blur", "gaussian", 4)])
    assert position_words(region.bbox) == ("bottom", "right")  # the bbox spans the image
    assert region.position == ("top", "left")
    assert region.position_share == pytest.approx(50 * 50 / blob.sum())
    truth = Truth([region, Region("r1", ~blob, None, [])], w, h)
    (hyd,) = [s for s in write_all(np.random.default_rng(0), truth) if s.subtask == "hyd"]
    assert "top left" in hyd.answer
    # a compact region or a grid cell keeps the bbox rule's words, wholly inside its cell
    cell = Region("c", mask(h, w, 50, 100, 0, 50), None)
    assert cell.position == position_words(cell.bbox) == ("bottom", "left") and cell.position_share == 1.0
    assert Region("w", np.ones((h, w), bool)).position == position_words([0.0, 0.0, 1.0, 1.0])
    third = Region("t", mask(90, 90, 30, 60, 60, 90), None, grid=3)
    assert third.position == ("middle", "right") and third.position_share == 1.0


def test_grounding_of_whole_image_says_whole_image():
    w = Region("whole", np.ones((8, 8), bool), None, [Distortion("darken", "gamma", 5)])
    samples = write_all(np.random.default_rng(0), Truth([w], 8, 8))
    grounding = [s for s in samples if s.task == "grounding"]
    assert grounding and all(s.whole_image and "image" in s.answer and
                             re.search(r"\b(whole|entire)\b", s.answer) for s in grounding)


def test_clean_image_has_no_grounding_and_is_excellent():
    r = Region("r0", np.ones((8, 8), bool), None, [])
    samples = write_all(np.random.default_rng(0), Truth([r], 8, 8))
    assert not [s for s in samples if s.task == "grounding"]
    assert [s for s in samples if s.task == "rating"][0].answer.endswith("excellent.")


def test_truth_check_of_rewrites():
    original = "Severe blur appears in the sky in the top left of the image. Overall, the quality of the image is poor."
    assert keeps_truth(original, "The sky at the top left suffers severe blur; overall the image quality is poor.")
    assert not keeps_truth(original, "The sky at the top left suffers mild blur; overall quality is poor.")
    assert not keeps_truth(original, "The sky at the top right suffers severe blur; overall quality is poor.")
    assert not keeps_truth(original, "The sky at the top left suffers severe blur and noise; quality is poor.")
    assert not keeps_truth(original, "")
    assert set(LEVEL_WORDS) <= set(truth_words(" ".join(LEVEL_WORDS)))
