"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

For clients that already speak the chat API that vLLM, SGLang and LMDeploy serve (the official
``openai`` package, LangChain, ...). A chat request is turned into the same `ParsedRequest` as
``/v1/assess`` and answered by the same code: the same deployments and batching, the same
limits, the same refusals, written in OpenAI's error shape (``requests.error_body``).

The conversation carries exactly one image, as an ``image_url`` content part: a ``data:`` URL
(base64), or an ``s3://`` URI in an allowed bucket (the server fetches nothing else). The
question is the text of the last user message. Which of the model's tasks answers it is
``iqa_spider.task`` (an extension field of the body, `ChatExtension`), by default ``auto``:

- ``rate`` when the text asks for a rating or score, or there is no text;
- ``ground`` when it asks where (where, which region/part, locate, point);
- else ``describe``: the global quality description.

``refer`` (with ``iqa_spider.region``) asks the distortions of a named region. The model was
fine-tuned on its four tasks, so a task asks the model its own trained question (a grounding
question goes as written); the answer is ``choices[0].message.content``, and everything the
model also gave (score, level probabilities, points, masks as RLE) is the response's
``iqa_spider`` field: the result-contract row of ``/v1/assess``.

``stream: true`` answers as server-sent events in OpenAI's chunk format, the whole answer in one
chunk once it is complete (the model's engine does not stream tokens). ``n`` must be 1. Decoding
is greedy with the deployment's token caps, so ``temperature``, ``top_p`` and
``max_tokens`` are accepted and have no effect.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from iqa_spider.infer.config import HYD_QUESTION
from iqa_spider.infer.planning import GLOBAL_DESC_QUESTION
from iqa_spider.serve.config import LimitsConfig
from iqa_spider.serve.requests import ApiError, ParsedRequest, check_options, parse_data_url
from iqa_spider.serve.schemas import AssessOptions, AssessResponse, MappingName
from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
TASKS = ("auto", "describe", "rate", "ground", "refer")
RATE_WORDS = re.compile(r"\b(rate|rating|score|mos)\b", re.IGNORECASE)
WHERE_WORDS = re.compile(r"\b(where|which (region|part|area)|locate|point (out|to))\b", re.IGNORECASE)


# ---------------------------------------------------------------------------- the request

class ImageURL(BaseModel):
    url: str = Field(..., description="data:image/...;base64,... or s3://bucket/key in an allowed bucket")
    detail: str | None = Field(None, description="accepted; the model's processor decides the resolution")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatExtension(BaseModel):
    """`iqa_spider` in the request body (`extra_body` of the openai client)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal[TASKS] = Field("auto", description="which task answers (see the route's description)")  # type: ignore[valid-type]
    region: str | None = Field(None, description="the region text a `refer` question is about")
    refer_long: StrictBool = Field(False, description="refer: the distortions' effects too")
    mapping: MappingName | None = Field(None, description="text-to-point mapping for `ground`")


class ChatRequest(BaseModel):
    """OpenAI's chat completion request. Other standard fields (temperature, top_p, seed, user,
    ...) are accepted and ignored: decoding is greedy."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., description="the served model's id (GET /v1/models)")
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: StrictBool = False
    n: int = 1
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    iqa_spider: ChatExtension = Field(default_factory=ChatExtension)


# ---------------------------------------------------------------------------- the response

class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop"] = "stop"
    logprobs: None = None


class ChatExtras(AssessResponse):
    """The result-contract row of the image (as /v1/assess answers it), and what was asked."""

    task: str = Field(..., description="the task that answered: describe, rate, ground or refer")
    question: str = Field(..., description="the question the model was asked")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    iqa_spider: ChatExtras = Field(..., description="score, level probabilities, points and masks")


class ModelCard(BaseModel):
    id: str = Field(..., description="what `model` of a chat request names")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "iqa-spider"
    model_uri: str | None = Field(None, description="what the service loaded")
    model_version: str | None = Field(None, description="its MLflow registry version")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, authentication_error, permission_error, "
                                        "not_found_error, rate_limit_error or server_error")
    param: str | None = None
    code: str = Field(..., description="the same stable code as /v1/assess's errors, e.g. not_an_image")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# ---------------------------------------------------------------------------- reading a chat

def served_model_id(info: dict) -> str:
    """The id clients name: a registered model's name (``models:/iqa-spider@champion`` ->
    ``iqa-spider``), else the loaded model's public URI."""
    uri = str(info.get("model_uri") or "iqa-spider")
    if uri.startswith("models:/"):
        return re.split(r"[@/]", uri.removeprefix("models:/"), maxsplit=1)[0]
    return uri


def _texts(message: ChatMessage) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [p.text for p in message.content or [] if isinstance(p, TextPart)]


def chat_inputs(body: ChatRequest) -> tuple[ImageURL, str]:
    """(the one image, the last user message's text)."""
    images = [p.image_url for m in body.messages if isinstance(m.content, list)
              for p in m.content if isinstance(p, ImagePart)]
    if len(images) != 1:
        raise ApiError(422, "one_image", f"the conversation has {len(images)} images; send exactly one, as an "
                                         "image_url content part of a user message")
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "invalid_request", "the conversation has no user message")
    return images[0], " ".join(t.strip() for t in _texts(users[-1]) if t.strip())


def route_task(question: str, ext: ChatExtension) -> str:
    if ext.task != "auto":
        return ext.task
    if not question or RATE_WORDS.search(question):
        return "rate"
    if WHERE_WORDS.search(question):
        return "ground"
    return "describe"


def chat_options(task: str, question: str, ext: ChatExtension) -> AssessOptions:
    if task == "describe":
        return AssessOptions(describe=True)
    if task == "ground":
        return AssessOptions(ground=[question] if question else True, mapping=ext.mapping)
    if task == "refer":
        if not ext.region:
            raise ApiError(422, "invalid_request", "task refer needs iqa_spider.region, the region text to ask about")
        return AssessOptions(refer=[ext.region], refer_long=ext.refer_long)
    return AssessOptions()  # rate: the score is always computed


def answer_text(task: str, row: dict) -> tuple[str, str]:
    """(the answer, the question the model was asked) of a task from its result row."""
    if task == "describe":
        return row.get("description") or "", GLOBAL_DESC_QUESTION
    if task == "ground":
        first = (row.get("regions") or [{}])[0]
        return first.get("answer") or "", first.get("query") or HYD_QUESTION
    if task == "refer":
        first = (row.get("referring") or [{}])[0]
        return first.get("answer") or "", first.get("query") or ""
    return f"{SCORE_ANSWER_PREFIX} {row['level']} (score {row['score']:.2f} of 5).", SCORE_QUESTION


def parsed_request(image: ImageURL, options: AssessOptions) -> ParsedRequest:
    url = image.url.strip()
    if url.startswith("data:"):
        data, declared = parse_data_url(url)
        return ParsedRequest(data, None, declared, options)
    if url.startswith(("s3://", "s3a://")):
        return ParsedRequest(None, url, None, options)
    raise ApiError(422, "unsupported_uri", "image_url.url must be a data: URL (base64) or s3://bucket/key in an "
                                           "allowed bucket; the service fetches no http(s) URLs")


def sse_events(done: ChatCompletion):
    """The answer as OpenAI's stream: one chunk with the whole content (it is complete before the
    first byte is sent, so every refusal is still a status code), one with the finish reason
    and the extras, then [DONE]."""
    head = {"id": done.id, "object": "chat.completion.chunk", "created": done.created, "model": done.model}
    first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": done.choices[0].message.content},
                                  "finish_reason": None}]}
    last = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "iqa_spider": done.iqa_spider.model_dump(mode="json")}
    for event in (first, last):
        yield f"data: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------- the routes

def add_openai_routes(app: FastAPI, answer: Callable[[ParsedRequest], Awaitable[dict]],
                      model_info: Callable[[], Awaitable[dict]], limits: LimitsConfig,
                      error_responses: dict[int, Any]) -> None:
    """`answer(parsed)`: the /v1/assess pipeline (timeout included), a result row plus the texts;
    `model_info()`: what the model deployment loaded, or a 503 while it loads."""
    started = int(time.time())
    responses = {code: {"model": OpenAIError, "description": spec["description"]}
                 for code, spec in error_responses.items()}

    async def card() -> ModelCard:
        info = await model_info()
        version = info.get("model_version")
        return ModelCard(id=served_model_id(info), created=started, model_uri=info.get("model_uri"),
                         model_version=None if version is None else str(version))

    @app.post(CHAT_PATH, summary="OpenAI-compatible chat completion about one image", response_model=ChatCompletion,
              responses=responses, description=__doc__.split("\n\n", 1)[1])
    async def chat_completions(body: ChatRequest):
        served = await card()
        if body.model not in (served.id, served.model_uri):
            raise ApiError(404, "model_not_found", f"this service serves {served.id!r}, not {body.model!r} "
                                                   "(GET /v1/models)")
        if body.n != 1:
            raise ApiError(400, "unsupported_parameter", f"n must be 1, got {body.n}")
        image, question = chat_inputs(body)
        task = route_task(question, body.iqa_spider)
        options = chat_options(task, question, body.iqa_spider)
        check_options(options, limits)  # the grounding question, the region text: as /v1/assess checks them
        row = await answer(parsed_request(image, options))
        content, asked = answer_text(task, row)
        done = ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.id,
                              choices=[Choice(message=AssistantMessage(content=content))],
                              iqa_spider=ChatExtras(**row, task=task, question=asked))
        return StreamingResponse(sse_events(done), media_type="text/event-stream") if body.stream else done

    @app.get(MODELS_PATH, summary="OpenAI-compatible list of the served model", response_model=ModelList,
             responses=responses)
    async def models():
        return ModelList(data=[await card()])

    @app.get(MODELS_PATH + "/{model_id:path}", summary="OpenAI-compatible description of the served model",
             response_model=ModelCard, responses=responses)
    async def model(model_id: str):
        served = await card()
        if model_id not in (served.id, served.model_uri):
            raise ApiError(404, "model_not_found", f"this service serves {served.id!r}, not {model_id!r}")
        return served


__all__ = ["add_openai_routes", "ChatRequest", "ChatCompletion", "ChatExtension", "ModelList", "CHAT_PATH",
           "MODELS_PATH", "route_task", "served_model_id"]
