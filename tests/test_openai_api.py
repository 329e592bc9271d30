"""The OpenAI-compatible routes' own rules, on the ingress app over a stand-in backend (no Ray):
which task answers, streaming, the bearer token as the client's api_key, and every refusal in
OpenAI's error shape while /v1/assess keeps its own. The real Serve app is tested with the
openai client in test_serve.py."""
from __future__ import annotations

import base64

import openai
import pytest
import requests

from iqa_spider.serve.chat import ChatExtension, route_task, served_model_id
from iqa_spider.serve.config import LimitsConfig
from test_serve import FakeBackend, fake_api, photo, png

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(photo(0))).decode()}}


def user(*parts) -> list[dict]:
    return [{"role": "system", "content": "You are an image quality expert."},
            {"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


@pytest.mark.parametrize("question, task", [
    ("", "rate"), ("How would you rate the quality of this image?", "rate"), ("Give it a score.", "rate"),
    ("Where is the worst quality in the image?", "ground"), ("Which region shows the most severe noise?", "ground"),
    ("Locate the blur.", "ground"), ("Describe the quality of this image.", "describe"),
    ("What do you think of this photo?", "describe"),
])
def test_auto_routes_a_question_to_a_task(question, task):
    assert route_task(question, ChatExtension()) == task
    assert route_task(question, ChatExtension(task="describe")) == "describe"  # an explicit task wins


def test_the_served_id_is_the_registered_name():
    assert served_model_id({"model_uri": "models:/iqa-spider@champion"}) == "iqa-spider"
    assert served_model_id({"model_uri": "models:/iqa-spider/3"}) == "iqa-spider"
    assert served_model_id({"model_uri": "local:tiny"}) == "local:tiny"


def test_chat_answers_streams_and_refuses_in_openais_shape():
    backend = FakeBackend()
    with fake_api(backend, LimitsConfig(max_body_bytes=64 * 1024)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["fake"]
        assert client.models.retrieve("fake").model_extra["model_version"] == "7"

        rated = client.chat.completions.create(model="fake", messages=user(text("Rate this image."), IMAGE))
        assert rated.choices[0].message.content == "The quality of the image is fair (score 3.00 of 5)."
        assert rated.model_extra["iqa_spider"]["level_probs"] == [0.2] * 5

        # the region text of a referring question travels as the extension field
        referred = client.chat.completions.create(
            model="fake", messages=user(text("What is wrong here?"), IMAGE),
            extra_body={"iqa_spider": {"task": "refer", "region": "the sky in the top left of the image"}})
        assert referred.model_extra["iqa_spider"]["task"] == "refer"

        chunks = list(client.chat.completions.create(model="fake", messages=user(text("Score?"), IMAGE), stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == rated.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].model_extra["iqa_spider"]["score"] == 3.0

        def refused(status: int, code: str, **kwargs):
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(**{"model": "fake", "messages": user(text("Rate."), IMAGE), **kwargs})
            assert err.value.status_code == status, err.value.body
            assert err.value.body["code"] == code and err.value.body["type"] and err.value.body["message"]

        refused(422, "one_image", messages=user(text("Rate.")))
        refused(422, "one_image", messages=user(text("Rate."), IMAGE, IMAGE))
        refused(422, "invalid_request", extra_body={"iqa_spider": {"task": "refer"}})       # no region
        refused(422, "invalid_request", extra_body={"iqa_spider": {"taks": "rate"}})        # a misspelt field
        refused(422, "unsupported_uri", messages=user({"type": "image_url", "image_url": {"url": "https://x/a.png"}}))
        refused(400, "bad_base64", messages=user({"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}))
        refused(422, "control_token", messages=user(text("Where is <|im_end|> the blur?"), IMAGE))
        refused(400, "unsupported_parameter", n=2)
        refused(404, "model_not_found", model="gpt-4o")
        big = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
        refused(413, "body_too_large", messages=user(big))

        r = requests.post(url + "/v1/chat/completions", data="{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
        # /v1/assess keeps the API's own error shape
        r = requests.post(url + "/v1/assess", json={})
        assert r.status_code == 422 and set(r.json()) == {"error", "detail", "status"}
    assert len(backend.seen) == 3   # the three answers; no refusal reached the model


def test_the_api_token_is_the_clients_api_key():
    with fake_api(FakeBackend(), api_token="s3cret") as url:
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="fake", messages=user(IMAGE)).model_extra["iqa_spider"]["task"] == "rate"
        bad = openai.OpenAI(base_url=url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            bad.models.list()
        assert err.value.body["type"] == "authentication_error" and err.value.body["code"] == "unauthorized"


def test_while_the_model_loads_chat_clients_get_a_quick_503_in_openais_shape():
    import time

    backend = FakeBackend()
    backend.mode = "loading"   # no model replica yet: a handle call waits
    with fake_api(backend) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        t0 = time.perf_counter()
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="fake", messages=user(IMAGE))
        assert time.perf_counter() - t0 < 10
        assert err.value.status_code == 503 and err.value.body["code"] == "not_ready"
        assert err.value.body["type"] == "server_error" and err.value.response.headers["retry-after"] == "5"
