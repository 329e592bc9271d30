"""Writers and the quality rule: every answer is derived from, and consistent with, the truth."""
import re

import numpy as np
import pytest

from iqa_spider.annotate.distortions import Distortion
from iqa_spider.annotate.rewrite import keeps_truth, truth_words
from iqa_spider.annotate.truth import Region, Truth, level_for_score, score_from_damages
from iqa_spider.annotate.writers import write_all
from iqa_spider.annotate import templates
from iqa_spider.vocab import DISTORTION_TERMS, LEVEL_WORDS, SEVERITY_WORDS, position_words


def mask(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def truth_two_regions():
    h, w = 60, 80
    sky = Region("r0", mask(h, w, 0, 20, 0, 40), "sky", [Distortion("blur", "gaussian", 4)])
    car = Region("r1", mask(h, w, 40, 60, 50, 80), None,
                 [Distortion("compression", "jpeg", 2), Distortion("noise", "gaussian", 3)])
    rest = Region("r2", ~(sky.mask | car.mask), None, [])
    return Truth([sky, car, rest], w, h)


def test_global_pool_has_26_questions():
    assert len(set(templates.GLOBAL_QUESTIONS)) == 26


def test_quality_rule():
    assert score_from_damages([]) == 5.0 and level_for_score(5.0) == "excellent"
    assert level_for_score(1.0) == "bad"
    whole = lambda s: Truth([Region("w", np.ones((4, 4), bool), None, [Distortion("noise", "gaussian", s)])], 4, 4)
    scores = [whole(s).quality_score() for s in range(1, 6)]
    assert scores == sorted(scores, reverse=True) and scores[-1] == 1.0
    # the same severity on a larger area is worse
    small = Truth([Region("a", mask(10, 10, 0, 2, 0, 2), None, [Distortion("blur", "gaussian", 3)])], 10, 10)
    big = Truth([Region("a", mask(10, 10, 0, 8, 0, 8), None, [Distortion("blur", "gaussian", 3)])], 10, 10)
    assert big.quality_score() < small.quality_score()


@pytest.mark.parametrize("seed", range(10))
def test_answers_agree_with_the_truth(seed):
    truth = truth_two_regions()
    samples = write_all(np.random.default_rng(seed), truth)
    tasks = {s.task for s in samples}
    assert {"global_desc", "local_desc", "grounding", "referring_short", "referring_long", "rating"} <= tasks
    level = truth.quality_level()
    by_id = {r.region_id: r for r in truth.regions}
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
            v, hword = position_words(region.bbox)
            assert f"{v} {hword}" in s.answer, (s.answer, region.bbox)
            if s.subtask == "hyd":
                assert region is truth.most_degraded()
            if s.subtask == "dao":
                first, second = (DISTORTION_TERMS[d.type] for d in region.distortions[:2])
                assert first in s.question and second in s.question
        if s.task.startswith("referring"):
            (rid,) = s.target_ids
            words = truth_words(s.answer)
            expected = {DISTORTION_TERMS[d.type] for d in by_id[rid].distortions}
            assert {w for w in words if w in DISTORTION_TERMS.values()} == expected


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


def test_rewriter_plumbing_with_the_tiny_model(tiny_model_dir):
    from iqa_spider.annotate.rewrite import Rewriter

    rewriter = Rewriter(str(tiny_model_dir), max_new_tokens=8)
    original = "Mild blur, moderate noise."
    answer, accepted = rewriter(original)
    # A random model almost never keeps the truth words; whatever it wrote, a rejected
    # rewrite leaves the template answer untouched and an accepted one kept the truth.
    if accepted:
        assert keeps_truth(original, answer)
    else:
        assert answer == original
