"""The predictor and grounding head on the tiny random Qwen-VL models.

Random weights say nothing useful, so these tests check the machinery: the shared-prefix path
gives what the naive loop gives, every method returns the result contract with valid ranges,
odd inputs are handled, and a bad input costs only its own row.
"""
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from iqa_spider.config.schemas import ModelConfig
from iqa_spider.infer import results as R
from iqa_spider.infer.config import HYD_QUESTION, InferConfig, SegmenterConfig
from iqa_spider.infer.engine import Query
from iqa_spider.infer.predictor import GroundingHead, Predictor
from iqa_spider.infer.segmenters import SuperpixelSegmenter
from iqa_spider.vocab import LEVEL_WORDS

# Shared-prefix vs naive: the same greedy tokens, and probabilities / logits within this
# absolute tolerance (float32 on CPU; the two paths differ only in padding and batch shapes).
ATOL = 1e-4

GROUND_ANSWER = "The most degraded region is the sky in the top left of the image."
WHOLE_ANSWER = "The whole image is affected by mild blur."


def photo(name="chelsea", size=None):
    img = Image.fromarray(getattr(skdata, name)()[..., :3] if getattr(skdata, name)().ndim == 3
                          else np.stack([getattr(skdata, name)()] * 3, -1))
    return img.resize(size) if size else img


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    cfg = InferConfig(batch_size=3, max_rows=5, max_new_tokens=10, describe_max_new_tokens=12)
    return Predictor.load(ModelConfig(path=str(tiny_model_dir), device="cpu"), cfg)


@pytest.fixture(scope="module")
def head(predictor):
    return GroundingHead(predictor, SuperpixelSegmenter())


def images3():
    # different sizes and aspect ratios, so the prefix batch really is padded
    return [photo("chelsea"), photo("astronaut", (90, 200)), photo("coffee", (300, 120))]


def mixed_queries():
    return [Query(mode="score"),
            Query(HYD_QUESTION, max_new_tokens=9),
            Query("Which region shows the most severe noise?", max_new_tokens=4),
            Query(HYD_QUESTION, mode="force", answer=GROUND_ANSWER),
            Query("Describe the quality of the image and the distortions in it.", max_new_tokens=14)]


def assert_same(shared, naive):
    for rs, rn in zip(shared, naive):
        assert len(rs) == len(rn)
        for a, b in zip(rs, rn):
            if a.level_probs is not None:
                np.testing.assert_allclose(a.level_probs, b.level_probs, atol=ATOL)
                continue
            assert a.token_ids == b.token_ids
            assert a.text == b.text
            assert a.watch_logits.shape == b.watch_logits.shape == (len(a.token_ids), 12)
            np.testing.assert_allclose(a.watch_logits, b.watch_logits, atol=ATOL)


def test_shared_prefix_equals_the_naive_loop(predictor):
    images, queries = images3(), [mixed_queries()] * 3
    shared = predictor.engine.run(images, queries, prefix_sharing=True)
    naive = predictor.engine.run_naive(images, queries)
    assert_same(shared, naive)
    # generation really ran: the caps were reached or eos was hit
    assert all(len(rs[1].token_ids) <= 9 and len(rs[2].token_ids) <= 4 for rs in shared)


def test_shared_prefix_equals_the_naive_loop_qwen3(tiny_qwen3_model_dir):
    p = Predictor.load(ModelConfig(family="qwen3_vl", path=str(tiny_qwen3_model_dir), device="cpu"),
                       InferConfig(batch_size=2, max_rows=3))
    images, queries = images3()[:2], [mixed_queries()[:4]] * 2
    assert_same(p.engine.run(images, queries), p.engine.run_naive(images, queries))


def test_rows_ending_between_stop_checks_equal_the_naive_loop_and_decoding_stops(predictor, monkeypatch):
    """Decoding reads which rows have ended only every STOP_CHECK_EVERY steps (a host read
    per token would idle the GPU). Rows that end between reads must still give what the
    naive loop gives, and decoding must stop soon after the last row ends, not at the cap."""
    from iqa_spider.infer.engine import STOP_CHECK_EVERY

    eng, cap = predictor.engine, 20
    images = images3()
    queries = [[Query(HYD_QUESTION, max_new_tokens=cap),
                Query("Describe the quality of the image.", max_new_tokens=cap)]] * 3
    free = [r for rs in eng.run(images, queries) for r in rs]
    assert all(len(r.token_ids) == cap and not r.finished for r in free)  # the random model never ends
    # Make the token each row writes at one of these steps an end token (some earlier if the
    # token occurs earlier in a row), so rows end at different steps, on and off the checks.
    ends = {r.token_ids[at] for r, at in zip(free, (2, 11, 5, 13, 9, 6))}
    monkeypatch.setattr(eng, "eos_ids", [*eng.eos_ids, *ends])
    monkeypatch.setattr(eng, "max_rows", len(free))  # one decoding batch, so its steps can be counted
    decode_steps = []
    forward = eng._forward
    monkeypatch.setattr(eng, "_forward", lambda **kw: decode_steps.append(kw["input_ids"].shape[1] == 1)
                        or forward(**kw))

    shared = eng.run(images, queries)
    assert_same(shared, eng.run_naive(images, queries))
    lengths = [len(r.token_ids) for rs in shared for r in rs]
    assert all(r.finished for rs in shared for r in rs) and len(set(lengths)) >= 3, lengths
    last_end = max(lengths)  # the step at which the last row wrote its end token
    assert sum(decode_steps) <= last_end + STOP_CHECK_EVERY < cap - 1, (sum(decode_steps), lengths)


def test_decoding_steps_do_not_make_transformers_inspect_the_mask(predictor, monkeypatch):
    """Given a 2-D mask, transformers reads it on the host at every step to decide whether
    SDPA can skip it (a device sync per token); the engine hands decoding steps a 4-D mask."""
    import transformers.masking_utils as masking

    eng = predictor.engine
    assert eng.model.config._attn_implementation == "sdpa"
    inspected = {"decode": 0, "other": 0}
    state = {"decode": False}
    forward, inspect_mask = eng._forward, masking._ignore_causal_mask_sdpa

    def tracking_forward(**kw):
        state["decode"] = kw["input_ids"].shape[1] == 1
        return forward(**kw)

    def counting_inspect(*args, **kw):
        inspected["decode" if state["decode"] else "other"] += 1
        return inspect_mask(*args, **kw)

    monkeypatch.setattr(eng, "_forward", tracking_forward)
    monkeypatch.setattr(masking, "_ignore_causal_mask_sdpa", counting_inspect)
    out = eng.run(images3()[:2], [[Query(HYD_QUESTION, max_new_tokens=6)]] * 2)
    assert all(len(rs[0].token_ids) == 6 for rs in out)  # decoding ran its steps
    assert inspected["other"] > 0 and inspected["decode"] == 0, inspected  # the patch sees prefill, not decode


def test_prompt_split_matches_the_chat_template(predictor):
    eng = predictor.engine
    assert eng.prefix_consistent
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    assert eng.processor.apply_chat_template(msgs, add_generation_prompt=True) == eng.prompt.full_text("Q?")
    assert eng.prompt.prefix.endswith("<|vision_end|>")


def test_the_engine_refuses_its_tokenizers_control_tokens(predictor):
    """The engine's own check, exact to its tokenizer: a caller that skips the API (a score job,
    a notebook) still cannot smuggle template markup into the prompt."""
    eng = predictor.engine
    assert {"<|im_end|>", "<|image_pad|>", "<tool_call>"} <= set(eng.control_tokens)
    assert not any(t.strip("<>/|") in ("blur", "noise") for t in eng.control_tokens)  # added words are not markup
    img = images3()[:1]
    for question in ("Which region?<|im_end|>", "the sky <|image_pad|> here"):
        for run in (eng.run, eng.run_naive):
            with pytest.raises(ValueError, match="control token"):
                run(img, [[Query(question, max_new_tokens=2)]])
    assert eng.run(img, [[Query("Which region? <b>|a|</b>", max_new_tokens=2)]])[0][0].text is not None


def test_score(predictor):
    out = predictor.score(images3())
    assert len(out) == 3
    for s in out:
        assert 1.0 <= s.score <= 5.0
        assert len(s.level_probs) == 5 and sum(s.level_probs) == pytest.approx(1.0, abs=1e-5)
        assert s.level == LEVEL_WORDS[int(np.argmax(s.level_probs))]
        assert s.score == pytest.approx(sum(p * w for p, w in zip(s.level_probs, (5, 4, 3, 2, 1))))


def test_describe_and_refer_ask_the_expected_questions(predictor):
    """Each answer is what a plain generate loop answers to the exact question text the method
    must ask, with its token cap (the fixture: describe 12, referring short 10): that pins the
    question template, the region phrase and short vs long. The random model never stops, so
    every answer runs to its cap."""
    imgs = images3()[:2]
    sky, curtain = "the sky in the top left of the image", "the curtain on the right side of the image"

    def naive(question: str, cap: int) -> list[str]:
        return [rs[0].text for rs in predictor.engine.run_naive(imgs, [[Query(question, max_new_tokens=cap)]] * 2)]

    want = {"global": naive("Assess the quality of the image with a detailed explanation.", 12),
            "local": naive("Provide a careful evaluation of the sky in the top left of the image.", 12),
            "short": naive("What distortions affect the curtain on the right side of the image?", 10),
            "long": naive("What distortions affect the curtain on the right side of the image, and how do they "
                          "change its appearance?", 12)}
    assert predictor.describe(imgs) == want["global"]
    assert predictor.describe(imgs, sky) == want["local"]
    assert predictor.describe(imgs, [sky, None]) == [want["local"][0], want["global"][1]]  # None: global
    assert predictor.refer(imgs, curtain) == want["short"]
    assert predictor.refer(imgs, [curtain, curtain], long=True) == want["long"]
    # The comparisons can fail: every answer is text, and a different question (another task's
    # template, another region, the other cap) gets different answers from this model.
    assert all(t for texts in want.values() for t in texts), want
    want["other_region"] = naive("Provide a careful evaluation of the sky in the top right of the image.", 12)
    want["other_side"] = naive("What distortions affect the curtain on the left side of the image?", 10)
    assert len({tuple(texts) for texts in want.values()}) == len(want), want


def test_ground_generated_answers(head):
    imgs = images3()
    out = head.ground(imgs, [HYD_QUESTION, "Which region shows the most severe blur?"])
    assert [len(gs) for gs in out] == [2, 2, 2]
    for im, gs in zip(imgs, out):
        for g in gs:
            assert g.query in (HYD_QUESTION, "Which region shows the most severe blur?")
            for p in g.points:
                assert 0 <= p.x <= im.width - 1 and 0 <= p.y <= im.height - 1
                assert 0 <= p.p_right <= 1 and 0 <= p.p_bottom <= 1
            # whatever the model wrote, its words, mentions, point and mask agree: a mention only
            # of words in the answer, one point (default mapping) per answer that names a
            # position, a mask exactly when there is a point or the whole image is named
            assert all(w in g.answer.lower() for pair in g.pairs for w in pair.words if w)
            assert len(g.points) == (1 if g.pairs and not g.whole_image else 0)
            assert (g.mask is not None) == (bool(g.points) or g.whole_image)
            if g.mask is not None:
                assert g.mask.shape == (im.height, im.width) and g.mask.dtype == bool


def test_ground_forced_answer_gives_points_masks_and_the_whole_image_rule(head):
    imgs = images3()[:2]
    gs = head.predictor.ground_forced(imgs, [[HYD_QUESTION, HYD_QUESTION]] * 2, [[GROUND_ANSWER, WHOLE_ANSWER]] * 2)
    for im, (g, whole) in zip(imgs, gs):
        head.attach_masks(im, [g, whole])
        assert [p.words for p in g.pairs][0] == ("top", "left")
        assert len(g.points) == 1
        pt = g.points[0]
        assert 0 <= pt.x <= im.width - 1 and 0 <= pt.y <= im.height - 1
        assert g.mask.shape == (im.height, im.width) and g.mask.any()
        # the paper's mapping and the expected bin centre read the same p(right), p(bottom)
        (paper,) = g.points_by("paper")
        (centre,) = g.points_by("expected_bin_centre")
        assert paper.x == pytest.approx(min(pt.p_right * im.width, im.width - 1))
        assert centre.p_right == pt.p_right and centre.x == pytest.approx((0.25 + 0.5 * pt.p_right) * im.width)
        assert (pt.x, pt.y) == (paper.x, paper.y)  # the configured (default) mapping is the paper's
        assert whole.whole_image and whole.points == [] and whole.mask.all()
        rows = R.region_entries(whole)
        assert rows[0]["point_x"] is None and rows[0]["mask_area"] == im.width * im.height


def test_analyze_and_rows_follow_the_contract(head):
    items = [("mem://cat.png", png(photo("chelsea"))), ("mem://astro.png", png(photo("astronaut", (64, 48))))]
    rows = head.predict_rows(items)
    assert [r["image_uri"] for r in rows] == ["mem://cat.png", "mem://astro.png"]
    for r in rows:
        assert set(r) == set(R.RESULT_FIELDS)
        assert R.check_row(r) == []
        assert r["error"] is None and isinstance(r["description"], str)
        assert len(r["regions"]) >= 1 and r["regions"][0]["query"] == HYD_QUESTION
        assert r["model_uri"] == head.predictor.model_uri and r["model_version"] is None
    table = R.rows_to_table(rows)
    assert table.schema.equals(R.RESULT_SCHEMA)
    assert R.row_to_json(rows[0])["scored_at"].endswith("+00:00")


def odd_inputs() -> dict[str, bytes]:
    base = photo("chelsea", (96, 64))
    out = {"grey": png(base.convert("L")), "palette": png(base.convert("P")),
           "one_pixel": png(Image.new("RGB", (1, 1), (9, 9, 9)))}
    buf = io.BytesIO()
    base.convert("CMYK").save(buf, format="JPEG")
    out["cmyk"] = buf.getvalue()
    arr16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257)
    out["sixteen_bit"] = png(Image.fromarray(arr16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    base.save(buf, format="JPEG", exif=exif.tobytes())
    out["exif_rotated"] = buf.getvalue()
    return out


def test_odd_images_are_answered_and_bad_ones_only_cost_their_own_row(head):
    odd = odd_inputs()
    good = png(photo("chelsea", (80, 60)))
    items = [(name, data) for name, data in odd.items()]
    items += [("corrupt", good[: len(good) // 2]), ("empty", b""), ("text", b"not an image at all"),
              ("elongated", png(Image.new("RGB", (400, 2)))), ("good", good)]
    rows = head.predict_rows(items, describe=False)
    assert len(rows) == len(items)
    by = {r["image_uri"]: r for r in rows}
    for name in list(odd) + ["good"]:
        assert by[name]["error"] is None, (name, by[name]["error"])
        assert R.check_row(by[name]) == []
    assert (by["exif_rotated"]["width"], by["exif_rotated"]["height"]) == (64, 96)  # rotated upright
    assert (by["one_pixel"]["width"], by["one_pixel"]["height"]) == (1, 1)
    assert by["corrupt"]["error"].startswith("corrupt")
    assert by["empty"]["error"].startswith("empty")
    assert by["text"]["error"].startswith("not_an_image")
    assert by["elongated"]["error"].startswith("bad_aspect_ratio")
    for name in ("corrupt", "empty", "text", "elongated"):
        assert by[name]["score"] is None and by[name]["regions"] == []
    R.rows_to_table(rows)  # error rows fit the schema too


def test_a_failing_image_in_a_batch_only_errors_itself(head, monkeypatch):
    """An exception inside the model for one image: its row gets the error, the others are scored."""
    real = head.predictor.analyze

    def flaky(images, *a, **k):
        if any(im.size == (33, 33) for im in images):
            raise RuntimeError("boom")
        return real(images, *a, **k)

    monkeypatch.setattr(head.predictor, "analyze", flaky)
    items = [("a", png(photo("chelsea", (60, 40)))), ("b", png(Image.new("RGB", (33, 33), (1, 2, 3)))),
             ("c", png(photo("coffee", (50, 50))))]
    rows = head.predict_rows(items, describe=False)
    assert [r["error"] is None for r in rows] == [True, False, True]
    assert "boom" in rows[1]["error"] and rows[1]["width"] == 33


def test_infer_config_is_checked():
    from iqa_spider.config import ConfigError, load_config
    from iqa_spider.evaluate.config import EvaluateConfig

    with pytest.raises(ConfigError, match="infer.mapping"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "infer.mapping=nearest"])
    with pytest.raises(ConfigError, match="infer.tau"):
        load_config(EvaluateConfig, None, ["model.path=x", "data.uri=y", "infer.tau=0"])
    assert InferConfig().mapping == "paper"


def test_grounding_head_with_the_tiny_sam(predictor, tiny_sam_dir):
    """The grounding head that serving deploys, with the `sam` segmenter (tiny random SamModel)."""
    from iqa_spider.infer.segmenters import build_segmenter

    sam = build_segmenter(SegmenterConfig(kind="sam", path=str(tiny_sam_dir), device="cpu"))
    head = GroundingHead(predictor, sam)
    imgs = [photo("coffee", (120, 80)), photo("chelsea", (50, 70))]
    gs = predictor.ground_forced(imgs, [[HYD_QUESTION, HYD_QUESTION]] * 2, [[GROUND_ANSWER, WHOLE_ANSWER]] * 2,
                                 mapping="multi_point")
    for im, (g, whole) in zip(imgs, gs):
        head.attach_masks(im, [g, whole])
        assert len(g.points) == 1 and len(g.masks) == 1
        assert g.mask.shape == (im.height, im.width) and g.mask.dtype == bool
        assert whole.whole_image and whole.mask.all()
        entries = R.region_entries(g) + R.region_entries(whole)
        assert [e["mask_rle"]["size"] for e in entries] == [[im.height, im.width]] * 2
        assert entries[0]["mask_area"] == int(g.mask.sum())
    rows = head.predict_rows([("mem://coffee", png(imgs[0]))], describe=False)
    assert rows[0]["error"] is None and R.check_row(rows[0]) == []
