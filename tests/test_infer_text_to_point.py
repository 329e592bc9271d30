"""Text-to-point arithmetic on fixed logits: step detection, mappings, whole-image rule."""
import math

import numpy as np
import pytest

from iqa_spider.infer.config import MAPPING_NAMES
from iqa_spider.infer.text_to_point import (
    MAPPINGS,
    PositionPair,
    PositionStep,
    PositionVocab,
    answer_position_words,
    find_pairs,
    get_mapping,
    is_whole_image,
    map_bins3x3,
    map_expected_bin_centre,
    map_multi_point,
    map_paper,
    softmax_words,
    two_way,
)


def v(step, word, top=0.0, middle=0.0, bottom=0.0):
    return PositionStep(step, "v", word, {"top": top, "middle": middle, "bottom": bottom})


def h(step, word, left=0.0, center=0.0, right=0.0):
    return PositionStep(step, "h", word, {"left": left, "center": center, "right": right})


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_registry_matches_config_names():
    assert tuple(MAPPINGS) == MAPPING_NAMES
    with pytest.raises(ValueError, match="unknown mapping"):
        get_mapping("nearest")


def test_softmax_with_temperature():
    s = v(0, "top", top=2.0, bottom=0.0)
    p = softmax_words(s, ("top", "bottom"), tau=1.0)
    assert p[0] == pytest.approx(sigmoid(2.0))
    p2 = softmax_words(s, ("top", "bottom"), tau=2.0)
    assert p2[0] == pytest.approx(sigmoid(1.0))
    assert p.sum() == pytest.approx(1.0)
    assert softmax_words(None, ("top", "bottom"), 1.0) is None


def test_paper_mapping_is_p_right_times_w():
    pair = PositionPair(v(3, "bottom", top=0.0, bottom=1.0), h(4, "right", left=0.0, right=math.log(3)))
    (pt,) = map_paper([pair], 200, 100, tau=1.0)
    assert pt.p_right == pytest.approx(0.75)
    assert pt.p_bottom == pytest.approx(sigmoid(1.0))
    assert pt.x == pytest.approx(0.75 * 200)
    assert pt.y == pytest.approx(sigmoid(1.0) * 100)


def test_paper_mapping_keeps_a_confident_point_inside_the_image():
    pair = PositionPair(v(0, "bottom", top=-50, bottom=50), h(1, "right", left=-50, right=50))
    (pt,) = map_paper([pair], 64, 32)
    assert pt.x == pytest.approx(63.0) and pt.y == pytest.approx(31.0)


def test_expected_bin_centre():
    pair = PositionPair(v(0, "top", top=50, bottom=-50), h(1, "left", left=0.0, right=0.0))
    (pt,) = map_expected_bin_centre([pair], 400, 300)
    assert pt.x == pytest.approx(0.5 * 400)        # undecided horizontally: middle
    assert pt.y == pytest.approx(0.25 * 300)       # certain "top": centre of the top half
    pair2 = PositionPair(v(0, "bottom", top=0, bottom=math.log(3)), h(1, "right", left=0, right=math.log(3)))
    (pt2,) = map_expected_bin_centre([pair2], 100, 100)
    assert pt2.x == pytest.approx((0.25 * 0.25 + 0.75 * 0.75) * 100)


def test_bins3x3_uses_the_three_word_vocabulary():
    pair = PositionPair(v(0, "middle", top=-50, middle=50, bottom=-50), h(1, "right", left=-50, center=-50, right=50))
    (pt,) = map_bins3x3([pair], 300, 90)
    assert pt.x == pytest.approx(5 / 6 * 300)
    assert pt.y == pytest.approx(0.5 * 90)
    # p_right / p_bottom are always the paper's 2-word probabilities
    assert pt.p_right == pytest.approx(1.0)
    assert pt.p_bottom == pytest.approx(0.5)
    uniform = PositionPair(v(0, "top"), h(1, "left"))
    (pu,) = map_bins3x3([uniform], 300, 90)
    assert pu.x == pytest.approx(150) and pu.y == pytest.approx(45)


def test_missing_axis_is_half():
    (pt,) = map_expected_bin_centre([PositionPair(v(0, "top", top=50, bottom=-50), None)], 100, 100)
    assert (pt.x, pt.y, pt.p_right, pt.p_bottom) == pytest.approx((50, 25, 0.5, 0.0))


def test_multi_point_gives_one_point_per_pair():
    pairs = [PositionPair(v(2, "top", top=50, bottom=-50), h(3, "left", left=50, right=-50)),
             PositionPair(v(9, "bottom", top=-50, bottom=50), h(10, "right", left=-50, right=50))]
    pts = map_multi_point(pairs, 100, 100)
    assert [c for p in pts for c in (p.x, p.y)] == pytest.approx([25, 25, 75, 75])
    assert len(map_expected_bin_centre(pairs, 100, 100)) == 1
    assert map_multi_point([], 100, 100) == [] == map_paper([], 10, 10)


def test_find_pairs_groups_adjacent_vertical_horizontal_and_puts_pairs_first():
    steps = [h(1, "left"), v(5, "top"), h(6, "right"), v(9, "bottom")]
    pairs = find_pairs(steps)
    assert [p.words for p in pairs] == [("top", "right"), (None, "left"), ("bottom", None)]
    # not adjacent: two lone mentions
    assert [p.words for p in find_pairs([v(1, "top"), h(3, "left")])] == [("top", None), (None, "left")]


def test_whole_image_rule():
    assert is_whole_image("The whole image is affected by mild blur.")
    assert is_whole_image("The ENTIRE image is degraded by noise.")
    assert not is_whole_image("The most degraded region is the sky in the top left of the image.")
    assert not is_whole_image("")


def test_answer_position_words_from_text():
    assert answer_position_words("The region is the sky in the top left of the image.") == [("top", "left")]
    assert answer_position_words("Noise appears on the left side; blur at the bottom.") == [(None, "left"), ("bottom", None)]
    assert answer_position_words("Nothing here.") == []


def test_position_vocab_reads_the_logits_of_the_written_form(tiny_model_dir):
    from transformers import AutoTokenizer

    from iqa_spider.model.tokenizer import word_token_id

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = PositionVocab(tok)
    assert len(vocab.watch_ids) == 12  # 6 words x {" word", "word"}
    ids = tok.encode("The region is the sky in the top left of the image.", add_special_tokens=False)
    watch = np.zeros((len(ids), len(vocab.watch_ids)), dtype=np.float32)
    t_top = ids.index(word_token_id(tok, "top"))
    t_left = ids.index(word_token_id(tok, "left"))
    col = {tid: i for i, tid in enumerate(vocab.watch_ids)}
    watch[t_top, col[word_token_id(tok, "bottom")]] = 2.0   # the model leaned towards "bottom"
    watch[t_left, col[word_token_id(tok, "right")]] = -1.0
    steps = vocab.steps(ids, watch)
    assert [(s.step, s.axis, s.word) for s in steps] == [(t_top, "v", "top"), (t_left, "h", "left")]
    pairs = find_pairs(steps)
    p_right, p_bottom = two_way(pairs[0], 1.0)
    assert p_bottom == pytest.approx(sigmoid(2.0))
    assert p_right == pytest.approx(sigmoid(-1.0))
