"""The HTTP API: FastAPI routes, request parsing, limits and JSON errors.

The app is built by :func:`build_api` around a *backend* (four coroutines: ``analyze``,
``segment``, ``model_info``, ``stats``). In Serve the backend is the ingress deployment,
whose coroutines call the model and grounding-head deployments through their handles; a
test or benchmark can give any other object with the same coroutines.

Routes (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /v1/assess``: one image, as a multipart upload (field ``image``), as base64 in a JSON
  body (``image_base64``), or as ``image_uri`` (``s3://`` in an allowed bucket); the tasks are
  fields of the same body. The answer is one result-contract row (JSON) plus ``referring``
  and ``local_descriptions`` for the texts asked about.
- ``GET /healthz``, ``GET /v1/model``, ``GET /v1/stats``.

Limits (``limits:`` of the config): body size (checked on Content-Length before reading and
while streaming), decoded pixels (read from the image header before decoding, so a
decompression bomb is never expanded), decoded memory of the requests in flight (an image is
decoded no larger than the model's pixel cap, and answered in its own size), allowed image
types (declared and sniffed), question count and length, and a per-request timeout. Every refusal is a JSON body
``{"error": code, "detail": why, "status": N}`` with a 4xx status. Nothing on the request path
unpickles anything: the body is JSON, multipart or base64 only.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
import typing
from typing import Any, Literal, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from pydantic import ValidationError as PydanticValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from iqa_spider.config.loader import BOOLEAN_WORDS, ConfigValueError, parse_bool
from iqa_spider.images import ImageError, decode_image, header_size, image_type, prepare_image
from iqa_spider.infer import results as R
from iqa_spider.infer.config import HYD_QUESTION, MAPPING_NAMES, control_token_in
from iqa_spider.infer.planning import Ask
from iqa_spider.serve.config import LimitsConfig

log = logging.getLogger("ray.serve")

API_VERSION = "v1"
# HTTP status of each ImageError reason (iqa_spider.images: decode_image and prepare_image).
IMAGE_ERROR_STATUS = {"empty": 422, "not_an_image": 415, "corrupt": 422, "too_many_pixels": 413,
                      "bad_aspect_ratio": 422}
JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)


class ApiError(Exception):
    """A refusal: status (4xx, or 502 when S3 fails), a short stable code and a sentence saying why."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, "status": status}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- schemas (docs)

MappingName = Literal[MAPPING_NAMES]  # type: ignore[valid-type]


class AssessOptions(BaseModel):
    """What to answer about the image. The Q-Align score is always computed (it shares the
    image prefill with every other question and the result contract requires it)."""

    model_config = ConfigDict(extra="forbid")

    # Strict: `ground: 1` or `describe: "yes"` is a client bug to report (422), not a true.
    describe: StrictBool = Field(False, description="global quality description")
    ground: StrictBool | list[StrictStr] = Field(
        False, description=f"grounding: true asks the HyD-G question ({HYD_QUESTION!r}); or a list of "
                           "grounding questions (HyD-G, SiD-G, DAO-G). Each answer gets point(s) and a mask.")
    refer: list[str] = Field(default_factory=list,
                             description="region texts to ask the distortions of, e.g. 'the sky in the top left "
                                         "of the image' (answers in `referring`)")
    refer_long: StrictBool = Field(False, description="long referring answers (distortions and their effects)")
    describe_regions: list[str] = Field(default_factory=list,
                                        description="region texts to describe locally (answers in `local_descriptions`)")
    mapping: MappingName | None = Field(None, description="text-to-point mapping for this request "
                                                             "(default: the deployment's)")

    def questions(self) -> list[str]:
        if self.ground is True:
            return [HYD_QUESTION]
        if self.ground is False:
            return []
        return list(self.ground)

    def ask(self) -> Ask:
        """What the model deployment plans from (`infer.planning`)."""
        return Ask(describe=self.describe, ground=tuple(self.questions()), describe_regions=tuple(self.describe_regions),
                   refer=tuple(self.refer), refer_long=self.refer_long)


# The multipart form's fields: the image (a file or an S3 URI) and every option, by name.
IMAGE_FIELDS = ("image", "image_uri")


class AssessJSON(AssessOptions):
    """JSON body: exactly one of image_base64 / image_uri, plus the task fields."""

    image_base64: str | None = Field(None, description="the encoded image (JPEG, PNG, ...) in base64; "
                                                          "a data: URL prefix is accepted")
    image_uri: str | None = Field(None, description="s3://bucket/key in one of the configured buckets")


class RegionOut(BaseModel):
    query: str
    answer: str
    point_x: float | None = None
    point_y: float | None = None
    p_right: float | None = None
    p_bottom: float | None = None
    mask_rle: dict[str, Any] | None = Field(None, description="COCO RLE {size: [h, w], counts: str}")
    mask_area: int | None = None
    bbox: list[float] | None = Field(None, description="x0, y0, x1, y1 of the mask in 0..1")


class TextAnswer(BaseModel):
    region: str
    query: str
    answer: str


class AssessResponse(BaseModel):
    """One row of the result contract (docs/architecture.md), plus the referring / local answers."""

    image_uri: str | None = None
    image_sha256: str
    width: int | None = None
    height: int | None = None
    score: float | None = Field(None, description="Q-Align score 1..5")
    level: str | None = None
    level_probs: list[float] | None = Field(None, description="p(excellent, good, fair, poor, bad)")
    description: str | None = None
    regions: list[RegionOut] = Field(default_factory=list)
    model_uri: str | None = None
    model_version: str | None = None
    error: str | None = None
    scored_at: str
    referring: list[TextAnswer] = Field(default_factory=list)
    local_descriptions: list[TextAnswer] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: str = Field(..., description="short stable code, e.g. body_too_large, not_an_image")
    detail: str = Field(..., description="why, in words")
    status: int


_ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "malformed JSON, multipart or base64",
    401: "IQA_SPIDER_API_TOKEN is set and the request has no or another bearer token",
    403: "image_uri in a bucket that is not allowed (or S3 inputs are off)",
    404: "image_uri does not exist",
    408: "the request took longer than limits.request_timeout_s",
    413: "body larger than limits.max_body_bytes, or image with more than limits.max_pixels pixels",
    415: "content type not allowed, or the bytes are not an allowed image type",
    422: "invalid fields, truncated/corrupt image, or an image the model cannot take",
    429: "the service is overloaded: retry later",
    502: "S3 failed to serve image_uri (endpoint down, throttled, 5xx): retry later (Retry-After)",
    503: "the model is not available (replica starting or gone)",
}.items()}


# How long the ingress waits for the model deployment before it answers 503 not_ready: before
# the model first answered (it is loading), and for the probe once it has (a busy replica).
NOT_READY_WAIT_S = 2.0
READY_PROBE_S = 10.0

# Optional authentication: a bearer token read from this variable where the ingress runs.
API_TOKEN_ENV = "IQA_SPIDER_API_TOKEN"
# Open without the token: the readiness probe (load balancers carry no credentials) and the
# API's own description (the Swagger page, its assets and the schema).
OPEN_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})
DOCS_ASSETS = "/docs/assets"


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(DOCS_ASSETS + "/")


# ---------------------------------------------------------------------------- body size limit

class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: at once from Content-Length, else while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    return await error_response(400, "bad_content_length", "Content-Length is not a number")(
                        scope, receive, send)
        if length is not None and length > self.max_bytes:
            return await error_response(413, "body_too_large",
                                        f"body of {length} bytes exceeds the limit of {self.max_bytes} bytes")(
                scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"body exceeds the limit of {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------- parsing

def _flag(value: str, key: str) -> bool:
    """A form field's boolean, read as everywhere (`parse_bool`); JSON bodies take JSON's
    true/false only (the pydantic model's StrictBool)."""
    try:
        return parse_bool(value, key)
    except ConfigValueError as exc:
        raise ApiError(422, "invalid_request", f"{key}: {exc}") from None


def _validation_detail(exc: PydanticValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts)


def _form_options(form) -> dict[str, Any]:
    """`AssessOptions` fields from a multipart form, read by each field's type: a boolean from
    its one text (`parse_bool`), a list from one form field per item, `ground` either way."""
    allowed = [*IMAGE_FIELDS, *AssessOptions.model_fields]
    unknown = sorted(set(form.keys()) - set(allowed))
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown form fields {unknown}; expected some of {sorted(allowed)}")
    opts: dict[str, Any] = {}
    for key, spec in AssessOptions.model_fields.items():
        values = [str(v) for v in form.getlist(key)]
        if not values:
            continue
        if key == "ground":  # true/false, or one field per grounding question
            is_flag = len(values) == 1 and values[0].strip().lower() in BOOLEAN_WORDS
            opts[key] = _flag(values[0], key) if is_flag else values
        elif spec.annotation is bool:
            opts[key] = _flag(values[-1], key)
        elif typing.get_origin(spec.annotation) is list:
            opts[key] = values
        else:
            opts[key] = values[-1]
    return opts


class ParsedRequest:
    def __init__(self, data: bytes | None, uri: str | None, declared_type: str | None, options: AssessOptions):
        self.data, self.uri, self.declared_type, self.options = data, uri, declared_type, options


def _b64(text: str) -> tuple[bytes, str | None]:
    declared = None
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "bad_base64", "a data: URL must be base64 encoded")
        declared = head[5:].split(";")[0].strip().lower() or None
    try:
        return base64.b64decode("".join(text.split()), validate=True), declared
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"image_base64 is not valid base64 ({exc})") from None


async def parse_request(request: Request, limits: LimitsConfig) -> ParsedRequest:
    ctype = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if ctype in JSON_TYPES:
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "malformed_json", f"the body is not valid JSON ({exc})") from None
        except RecursionError:  # a few KB of brackets nest deeper than Python's parser recurses
            raise ApiError(400, "malformed_json", "the JSON body is nested too deeply") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "malformed_json", "the JSON body must be an object")
        try:
            body = AssessJSON.model_validate(payload)
        except PydanticValidationError as exc:
            raise ApiError(422, "invalid_request", _validation_detail(exc)) from None
        if (body.image_base64 is None) == (body.image_uri is None):
            raise ApiError(422, "invalid_request", "give exactly one of image_base64 and image_uri")
        options = AssessOptions.model_validate(body.model_dump(exclude={"image_base64", "image_uri"}))
        if body.image_base64 is not None:
            data, declared = _b64(body.image_base64)
            return ParsedRequest(data, None, declared, options)
        return ParsedRequest(None, body.image_uri, None, options)
    if ctype in MULTIPART_TYPES:
        try:
            form = await request.form(max_files=1, max_fields=64, max_part_size=64 * 1024)
        except BodyTooLarge:
            raise
        except StarletteHTTPException as exc:
            raise ApiError(400, "malformed_multipart", str(exc.detail)) from None
        try:
            opts = _form_options(form)
            try:
                options = AssessOptions.model_validate(opts)
            except PydanticValidationError as exc:
                raise ApiError(422, "invalid_request", _validation_detail(exc)) from None
            upload = form.get("image")
            uri = form.get("image_uri")
            if isinstance(upload, UploadFile) == isinstance(uri, str):
                raise ApiError(422, "invalid_request", "give exactly one of the file field `image` and `image_uri`")
            if isinstance(upload, UploadFile):
                data = await upload.read()
                declared = (upload.content_type or "").split(";")[0].strip().lower() or None
                return ParsedRequest(data, None, declared, options)
            return ParsedRequest(None, str(uri), None, options)
        finally:
            await form.close()
    raise ApiError(415, "unsupported_content_type",
                   f"send multipart/form-data or application/json, not {ctype or 'no Content-Type'}")


def check_options(options: AssessOptions, limits: LimitsConfig) -> None:
    texts = options.questions() + list(options.refer) + list(options.describe_regions)
    if len(texts) > limits.max_questions:
        raise ApiError(422, "too_many_questions",
                       f"{len(texts)} questions and region texts; the limit is {limits.max_questions}")
    for t in texts:
        if not t.strip():
            raise ApiError(422, "invalid_request", "an empty question or region text")
        if len(t) > limits.max_text_chars:
            raise ApiError(422, "text_too_long", f"a question or region text of {len(t)} characters; "
                                                 f"the limit is {limits.max_text_chars}")
        token = control_token_in(t)
        if token:
            raise ApiError(422, "control_token", f"a question or region text holds the markup {token[:40]!r}; "
                                                 "questions are plain text")


def _read_s3(uri: str, max_bytes: int) -> bytes:
    from iqa_spider import storage

    fs, path = storage.get_fs(uri)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ApiError(413, "body_too_large", f"{uri} has {size} bytes; the limit is {max_bytes} bytes")
    with fs.open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "body_too_large", f"{uri} exceeds the limit of {max_bytes} bytes")
    return data


# S3's bucket naming rule (3-63 characters of lower-case letters, digits, dots and hyphens).
S3_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Key characters that the filesystem layer reads as syntax, not as part of the name: fsspec
# chains URLs at "::" (x.jpg::file:///etc/passwd), s3fs takes "?versionId=" as a version.
S3_KEY_SYNTAX = ("::", "?", "#")


def check_s3_uri(uri: str) -> str:
    """A client's image_uri names one S3 object and nothing else (else 422); returns its bucket."""
    if not uri.startswith(("s3://", "s3a://")):
        raise ApiError(422, "unsupported_uri", "image_uri must be s3://bucket/key")
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    if not S3_BUCKET_NAME.fullmatch(bucket):
        raise ApiError(422, "unsupported_uri", f"{bucket[:64]!r} is not an S3 bucket name")
    if not key or key.endswith("/") or ".." in key.split("/"):
        raise ApiError(422, "unsupported_uri", "image_uri does not name an object")
    if any(s in key for s in S3_KEY_SYNTAX) or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ApiError(422, "unsupported_uri", "image_uri may not hold '::', '?', '#' or control characters "
                                               "(they would be read as a URL chain, a version or a fragment)")
    return bucket


async def fetch_uri(uri: str, limits: LimitsConfig) -> bytes:
    """The bytes of an ``s3://`` image in an allowed bucket (never a local path)."""
    bucket = check_s3_uri(uri)
    if not limits.allowed_s3_buckets:
        raise ApiError(403, "s3_not_allowed", "this service reads no S3 buckets (limits.allowed_s3_buckets is empty)")
    if bucket not in limits.allowed_s3_buckets:
        raise ApiError(403, "s3_bucket_not_allowed", f"bucket {bucket!r} is not one this service may read")
    try:
        return await asyncio.to_thread(_read_s3, uri, limits.max_body_bytes)
    except ApiError:
        raise
    except FileNotFoundError:
        raise ApiError(404, "not_found", f"{uri} does not exist") from None
    except PermissionError:
        raise ApiError(403, "s3_forbidden", f"access to {uri} is denied") from None
    except Exception as exc:  # noqa: BLE001 - S3 itself failed (endpoint down, throttled, 5xx)
        # Not the request's fault: 502 with Retry-After, so clients retry instead of dropping it.
        # The client learns the kind of failure; the endpoint and the exception text (which
        # name the internal S3 host) stay in the server's log.
        log.warning("reading %s failed: %s: %s", uri, type(exc).__name__, exc)
        raise ApiError(502, "s3_unavailable", f"S3 did not answer for {uri} ({type(exc).__name__}); retry later",
                       {"Retry-After": "5"}) from None


def decode_checked(data: bytes, declared: str | None, limits: LimitsConfig, fit_pixels: int | None = None):
    """Validated PIL image (8-bit RGB) or ApiError, no larger than ``fit_pixels`` (the model's
    own pixel cap: it never sees more). Runs in a worker thread."""
    allowed = limits.allowed_content_types
    if declared and declared not in ("application/octet-stream",) and declared not in allowed:
        raise ApiError(415, "unsupported_media_type", f"image type {declared} is not allowed; allowed: {allowed}")
    if not data:
        raise ApiError(422, "empty", "the image has zero bytes")
    sniffed = image_type(data[:16])
    if sniffed is None:
        raise ApiError(415, "not_an_image", "the bytes are not an image of a known format "
                                            f"(allowed: {', '.join(allowed)})")
    if sniffed not in allowed:
        raise ApiError(415, "unsupported_media_type", f"image type {sniffed} is not allowed; allowed: {allowed}")
    try:
        return prepare_image(decode_image(data, limits.max_pixels, fit_pixels))
    except ImageError as exc:
        raise ApiError(IMAGE_ERROR_STATUS.get(exc.reason, 422), exc.reason, str(exc)[:300]) from None


# ---------------------------------------------------------------------------- decoded memory

# Bytes a request holds per pixel of its image while in flight: the decoded RGB image and the
# array the model deployment gets (3 + 3), plus room for a mode conversion (a palette or 16-bit
# PNG is converted once). About what a 25 MP PNG was measured to cost (215 MB).
DECODED_BYTES_PER_PIXEL = 8


def decoded_pixels(data: bytes, size: tuple[int, int] | None, fit_pixels: int | None, limits: LimitsConfig) -> int:
    """The most pixels decoding ``data`` holds at once: the whole image, except a JPEG decoded
    for ``fit_pixels`` (the codec's reduced scale stops within twice the side asked: 4x the
    pixels). 0 for an image refused from its header (unreadable, or over max_pixels)."""
    if size is None or size[0] * size[1] > limits.max_pixels:
        return 0
    full = size[0] * size[1]
    if fit_pixels and image_type(data[:16]) == "image/jpeg":
        return min(full, 4 * fit_pixels)
    return full


class DecodeBudget:
    """The decoded image bytes the requests in flight of one ingress replica may hold."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used = int(limit_bytes), 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int):
        if nbytes > self.limit:
            raise ApiError(413, "too_many_pixels", f"the image needs about {nbytes // 2**20} MB decoded; this service "
                                                   f"holds at most {self.limit // 2**20} MB (limits.max_decoded_mb_in_flight)")
        async with self._changed:  # wait for a share; the request's own timeout still applies
            await self._changed.wait_for(lambda: self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


# ---------------------------------------------------------------------------- the app

class Backend(Protocol):
    async def analyze(self, image: np.ndarray, spec: dict) -> dict: ...
    async def segment(self, image: np.ndarray, groundings: list[dict],
                      size: tuple[int, int] | None = None) -> list[dict]: ...
    async def model_info(self) -> dict: ...
    async def stats(self) -> dict: ...


class BackendUnavailable(Exception):
    """The model or grounding deployment could not answer (starting, gone, overloaded)."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


def build_row(parsed: ParsedRequest, data: bytes, result: dict, regions: list[dict]) -> dict:
    """The result-contract row (JSON) of one answered request, plus the referring and local answers."""
    row = R.result_row(parsed.uri, hashlib.sha256(data).hexdigest(), result["width"], result["height"],
                       score=result.get("score"), description=result.get("description"), regions=regions,
                       model_uri=result.get("model_uri"), model_version=result.get("model_version"))
    return {**R.row_to_json(row), "referring": result.get("referring", []),
            "local_descriptions": result.get("local_descriptions", [])}


# An image_uri as check_s3_uri takes it: a bucket name, then a key without "::", "?", "#",
# control characters or a trailing "/" (ECMA regex, as OpenAPI reads it).
S3_URI_PATTERN = r"^s3a?://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/(?!.*::)(?!(.*/)?\.\.(/|$))[^?#\x00-\x1f\x7f]*[^/?#\x00-\x1f\x7f]$"


def _exactly_one(a: str, b: str) -> list[dict]:
    return [{"required": [a], "not": {"required": [b]}}, {"required": [b], "not": {"required": [a]}}]


def request_schemas(limits: LimitsConfig) -> tuple[dict, dict]:
    """The documented JSON and multipart bodies of /v1/assess, with this deployment's limits.

    As tight as a schema can say it, so a request a schema fuzzer builds from them is not
    refused for its form: exactly one image source, non-empty texts within
    ``limits.max_text_chars``, at most ``limits.max_questions`` per list. What a schema cannot
    say (the question count summed over the lists, chat-template markup, the image's own
    bytes) is in the descriptions and the 4xx responses.
    """
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars, "pattern": r"\S",
            "description": "plain text (no chat-template markup such as <|im_end|>)"}
    texts = {"type": "array", "items": text, "maxItems": limits.max_questions}
    uri = {"type": "string", "pattern": S3_URI_PATTERN, "description": "s3://bucket/key in one of the configured buckets"}
    json_schema = AssessJSON.model_json_schema(ref_template="#/components/schemas/{model}")
    props = json_schema["properties"]
    props["image_base64"] = {"type": "string", "minLength": 1, "description": props["image_base64"]["description"]}
    props["image_uri"] = uri
    props["ground"]["anyOf"] = [{"type": "boolean"}, texts]
    for key in ("refer", "describe_regions"):
        props[key] = {**texts, "description": props[key]["description"]}
    json_schema["oneOf"] = _exactly_one("image_base64", "image_uri")
    json_schema["description"] += (f" At most {limits.max_questions} texts in ground, refer and describe_regions "
                                   "together.")
    # The form takes the same options as the JSON body (its properties, less the nulls a form
    # cannot send), plus the image as a file.
    form_options = {key: dict(props[key]) for key in AssessOptions.model_fields}
    form_options["ground"]["description"] = "true for the HyD-G question, or one field per grounding question"
    form_options["refer"]["description"] = "one field per region text"
    for prop in form_options.values():
        if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
            (non_null,) = [p for p in prop.pop("anyOf") if p != {"type": "null"}]
            prop.update(non_null)
            prop.pop("default", None)
    multipart_schema = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file"},
            "image_uri": {**uri, "description": "s3://bucket/key (instead of a file)"},
            **form_options,
        },
        "additionalProperties": False,
        "oneOf": _exactly_one(*IMAGE_FIELDS),
    }
    return json_schema, multipart_schema


def add_offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from the assets the swagger-ui-bundle package ships (FastAPI's
    offline recipe), so the page works on a cluster with no internet."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from starlette.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def bearer_auth(token: str):
    """HTTP middleware: every route but the probe and the docs needs "Authorization: Bearer <token>"."""
    expected = f"Bearer {token}".encode()

    async def check(request: Request, call_next):
        if not is_open_path(request.url.path):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time: no token guessing by timing
                return error_response(401, "unauthorized", "send Authorization: Bearer <the server's token>",
                                      {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    return check


def build_api(backend: Backend, limits: LimitsConfig, api_token: str | None = None) -> FastAPI:
    """The ingress app. With ``api_token`` (the ingress passes $IQA_SPIDER_API_TOKEN), every
    route but OPEN_PATHS answers 401 without that bearer token."""
    app = FastAPI(
        title="IQA-Spider",
        version=API_VERSION,
        docs_url=None,   # served below from local assets: FastAPI's default page loads them from a CDN,
        redoc_url=None,  # which an offline cluster cannot reach (and ReDoc has no packaged assets)
        description="Explainable image quality assessment: a Q-Align score, descriptions, referring answers and "
                    "pixel-level grounding (point + mask) from one multimodal model. Every refusal is a 4xx "
                    "JSON error `{error, detail, status}`.",
    )

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge):
        return error_response(413, "body_too_large", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", "; ".join(str(e.get("msg")) for e in exc.errors()[:5]))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(_: Request, exc: BackendUnavailable):
        return error_response(exc.status, exc.error, exc.detail, {"Retry-After": "5"})

    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    if api_token:
        app.middleware("http")(bearer_auth(api_token))  # outermost: refused before the body is read

    json_schema, multipart_schema = request_schemas(limits)
    budget = DecodeBudget(limits.max_decoded_mb_in_flight * 2**20)

    # Ready once the model deployment has answered. Until then a probe or a request gets the
    # JSON 503 not_ready within NOT_READY_WAIT_S, not after a model-load-long wait; afterwards
    # the probe allows a busy replica READY_PROBE_S to answer.
    readiness = {"ready": False}

    async def model_ready() -> tuple[dict | None, str | None]:
        wait = READY_PROBE_S if readiness["ready"] else NOT_READY_WAIT_S
        try:
            info = await asyncio.wait_for(backend.model_info(), timeout=wait)
        except Exception as exc:  # noqa: BLE001 - starting, gone or overloaded: not ready
            return None, f"the model deployment does not answer within {wait:g}s ({type(exc).__name__}): " \
                         "it is starting (loading the model) or gone; retry"
        readiness["ready"] = True
        readiness["fit_pixels"] = info.get("max_pixels")  # the processor's cap: decode no larger
        return info, None

    async def _assess(request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        parsed = await parse_request(request, limits)
        check_options(parsed.options, limits)
        if not readiness["ready"]:
            _, why = await model_ready()
            if why:
                raise ApiError(503, "not_ready", why, {"Retry-After": "5"})
        data = parsed.data if parsed.data is not None else await fetch_uri(parsed.uri or "", limits)
        size = header_size(data)
        fit = readiness.get("fit_pixels")
        async with budget.hold(decoded_pixels(data, size, fit, limits) * DECODED_BYTES_PER_PIXEL):
            # held until the answer: the array lives on while the model and the segmenter run
            image = await asyncio.to_thread(decode_checked, data, parsed.declared_type, limits, fit)
            arr = np.asarray(image, dtype=np.uint8)
            del image
            o = parsed.options
            # size: the image's own (from the header), which every answer is given in, whatever
            # size it was decoded at
            full = size if size and arr.shape[1] * arr.shape[0] < size[0] * size[1] else None
            spec = {**o.ask().as_spec(), "mapping": o.mapping, "size": list(full) if full else None}
            result = await backend.analyze(arr, spec)
            if result.get("error"):
                raise ApiError(422, "inference_failed", str(result["error"])[:300])
            regions = await backend.segment(arr, result["groundings"], full) if result.get("groundings") else []
        row = build_row(parsed, data, result, regions)
        log.info("assess %dx%d %s in %.3fs", row["width"], row["height"],
                 ",".join(k for k, v in spec.items() if v) or "score", time.perf_counter() - t0)
        return JSONResponse(row)

    @app.post(
        "/v1/assess",
        summary="Assess one image",
        description="Score the image (always), and on request describe it, ground questions (point + mask) and "
                    "answer referring questions about named regions. Send multipart/form-data (file field "
                    "`image`) or JSON (`image_base64` or `image_uri`).",
        response_model=None,
        responses={200: {"model": AssessResponse, "description": "a result-contract row"}, **_ERRORS},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": json_schema},
            "multipart/form-data": {"schema": multipart_schema},
        }}},
    )
    async def assess(request: Request):
        try:
            return await asyncio.wait_for(_assess(request), timeout=limits.request_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two before
            raise ApiError(408, "timeout", f"the request took longer than {limits.request_timeout_s:g}s") from None

    add_offline_docs(app)

    @app.get("/healthz", summary="Liveness and readiness",
             responses={200: {"description": "ready: the model deployment answers"},
                        503: {"model": ErrorBody, "description": "not_ready: the model deployment does not "
                                                                  "answer within 10 s (starting or gone)"}})
    async def healthz():
        info, why = await model_ready()
        if info is None:
            return error_response(503, "not_ready", why, {"Retry-After": "5"})
        return {"status": "ok", "model_uri": info.get("model_uri"), "model_version": info.get("model_version")}

    @app.get("/v1/model", summary="The loaded model, segmenter and limits")
    async def model():
        info = await backend.model_info()
        return {**info, "limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__}}

    @app.get("/v1/stats", summary="Batching statistics of the model replica that answers")
    async def stats():
        return await backend.stats()

    return app


__all__ = ["build_api", "bearer_auth", "API_TOKEN_ENV", "OPEN_PATHS", "ApiError", "BackendUnavailable",
           "AssessOptions", "AssessJSON", "AssessResponse", "ErrorBody", "BodyLimitMiddleware", "parse_request",
           "decode_checked", "fetch_uri", "check_s3_uri", "IMAGE_ERROR_STATUS", "DecodeBudget",
           "DECODED_BYTES_PER_PIXEL"]
