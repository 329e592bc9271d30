"""The MLflow pyfunc backend: DataFrame of images in, result-contract rows out (tiny model)."""
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from iqa_spider.infer import results as R
from iqa_spider.infer.config import HYD_QUESTION
from iqa_spider.infer.pyfunc_backend import load_predictor, predict_frame


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def head(tiny_model_dir, monkeypatch_module):
    monkeypatch_module.setenv("IQA_SPIDER_DEVICE", "cpu")
    monkeypatch_module.delenv("IQA_SPIDER_SEGMENTER", raising=False)
    h = load_predictor(str(tiny_model_dir))
    h.predictor.cfg.max_new_tokens = 8  # keep generation short on CPU
    h.predictor.cfg.describe_max_new_tokens = 8
    return h


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_score_only_by_default_bytes_and_uris(head, tmp_path):
    on_disk = tmp_path / "b.png"
    on_disk.write_bytes(png(noise_image(1)))
    frame = pd.DataFrame({"image": [png(noise_image(0)), None, None, b"garbage"],
                          "image_uri": [None, str(on_disk), str(tmp_path / "missing.png"), "mem://garbage"]})
    out = predict_frame(head, frame, {})
    assert list(out.columns) == list(R.RESULT_FIELDS) and len(out) == 4
    rows = out.to_dict("records")
    for r in rows[:2]:
        assert r["error"] is None and R.check_row(r) == []
        assert 1 <= r["score"] <= 5 and sum(r["level_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert r["regions"] == [] and r["description"] is None   # score only
        assert r["model_uri"] == str(head.predictor.model_uri) and r["model_version"] is None
    assert rows[1]["image_uri"] == str(on_disk) and (rows[1]["width"], rows[1]["height"]) == (64, 48)
    assert rows[2]["error"].startswith("unreadable") and rows[2]["image_uri"].endswith("missing.png")
    assert rows[3]["error"].startswith("not_an_image") and rows[3]["image_uri"] == "mem://garbage"
    # the same image through bytes or a URI scores the same
    again = predict_frame(head, pd.DataFrame({"image": [png(noise_image(1))]}), {})
    assert again.loc[0, "score"] == pytest.approx(rows[1]["score"], abs=1e-5)
    R.rows_to_table(rows)  # fits the Parquet schema of batch scoring


def naive_answer(head, image: Image.Image, question: str) -> str:
    """What a plain generate loop answers to ``question`` with the fixture's cap of 8 tokens."""
    from iqa_spider.infer.engine import Query

    return head.predictor.engine.run_naive([image], [[Query(question, max_new_tokens=8)]])[0][0].text


def test_grounding_and_description_on_request(head):
    image = noise_image(2, (80, 60))
    frame = pd.DataFrame({"image_uri": ["mem://a"], "image": [png(image)]})
    out = predict_frame(head, frame, {"ground": "true", "describe": True, "mapping": "expected_bin_centre"})
    (r,) = out.to_dict("records")
    assert r["error"] is None and R.check_row(r) == []
    # the description answers the global description question, the region the HyD-G question
    # (PNG is lossless: the decoded image is ``image``); a random model answers other questions
    # differently, so a wrong question or an empty answer fails here
    description = naive_answer(head, image, "Assess the quality of the image with a detailed explanation.")
    assert description and r["description"] == description
    assert description != naive_answer(head, image, "Describe the quality of the image and the distortions in it.")
    assert [g["query"] for g in r["regions"]] == [HYD_QUESTION]
    assert r["regions"][0]["answer"] == naive_answer(head, image, HYD_QUESTION) != description
    assert head.predictor.cfg.mapping == "paper"  # a per-call mapping is not sticky
    two = predict_frame(head, frame, {"ground_questions": '["Which region shows the most severe noise?", "'
                                                          + HYD_QUESTION + '"]'})
    assert {g["query"] for g in two.loc[0, "regions"]} == {HYD_QUESTION, "Which region shows the most severe noise?"}


def test_bad_requests_fail_clearly(head):
    with pytest.raises(ValueError, match="'image'"):
        predict_frame(head, pd.DataFrame({"x": [1]}), {})
    with pytest.raises(ValueError, match="unknown params"):
        predict_frame(head, pd.DataFrame({"image": [b""]}), {"temperature": 1})
    with pytest.raises(ValueError, match="mapping"):
        predict_frame(head, pd.DataFrame({"image": [b""]}), {"mapping": "nearest"})
    empty = predict_frame(head, pd.DataFrame({"image": [b"", None]}), {})
    assert empty["error"].str.startswith("empty").tolist() == [True, False]
    assert empty.loc[1, "error"].startswith("no_input")
