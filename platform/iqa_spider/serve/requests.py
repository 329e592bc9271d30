"""Reading one request: the body-size limit, the JSON or multipart body and its options, the
image's bytes (inline, or from an allowed S3 bucket) and its decoding within the pixel and
memory limits. Every refusal is an `ApiError`, which the app turns into a JSON 4xx."""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import typing
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError as PydanticValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from iqa_spider import storage
from iqa_spider.config.loader import BOOLEAN_WORDS, ConfigValueError, parse_bool
from iqa_spider.images import ImageError, decode_image, image_type, prepare_image
from iqa_spider.infer.config import control_token_in
from iqa_spider.serve.config import LimitsConfig
from iqa_spider.serve.schemas import IMAGE_FIELDS, AssessJSON, AssessOptions

log = logging.getLogger("ray.serve")

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


# The OpenAI-compatible routes (serve.chat) answer errors in OpenAI's shape, so its clients raise
# their own typed errors (openai.BadRequestError, ...); every other route in the API's own.
OPENAI_PATHS = ("/v1/chat/", "/v1/models")
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      429: "rate_limit_error"}


def error_body(status: int, error: str, detail: str, path: str | None = None) -> dict:
    if path is not None and path.startswith(OPENAI_PATHS):
        kind = OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": detail, "type": kind, "param": None, "code": error}}
    return {"error": error, "detail": detail, "status": status}


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None,
                   path: str | None = None) -> JSONResponse:
    """The JSON refusal; ``path``: the request's, which picks the shape (`error_body`)."""
    return JSONResponse(error_body(status, error, detail, path), status_code=status, headers=headers)


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
                    return await error_response(400, "bad_content_length", "Content-Length is not a number",
                                                path=scope.get("path"))(scope, receive, send)
        if length is not None and length > self.max_bytes:
            return await error_response(413, "body_too_large",
                                        f"body of {length} bytes exceeds the limit of {self.max_bytes} bytes",
                                        path=scope.get("path"))(scope, receive, send)
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


def validation_detail(exc: PydanticValidationError | RequestValidationError) -> str:
    """pydantic's first errors, each with where it is (messages.0.content); FastAPI's typed
    bodies prefix every location with "body", which says nothing here."""
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
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


def parse_data_url(text: str, field: str = "image_url.url") -> tuple[bytes, str | None]:
    """(bytes, declared MIME type or None) of base64 text, with or without a data: URL prefix."""
    declared = None
    if text.startswith("data:"):
        head, _, text = text.partition(",")
        if ";base64" not in head:
            raise ApiError(400, "bad_base64", "a data: URL must be base64 encoded")
        declared = head[5:].split(";")[0].strip().lower() or None
    try:
        return base64.b64decode("".join(text.split()), validate=True), declared
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "bad_base64", f"{field} is not valid base64 ({exc})") from None


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
            raise ApiError(422, "invalid_request", validation_detail(exc)) from None
        if (body.image_base64 is None) == (body.image_uri is None):
            raise ApiError(422, "invalid_request", "give exactly one of image_base64 and image_uri")
        options = AssessOptions.model_validate(body.model_dump(exclude={"image_base64", "image_uri"}))
        if body.image_base64 is not None:
            data, declared = parse_data_url(body.image_base64, "image_base64")
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
                raise ApiError(422, "invalid_request", validation_detail(exc)) from None
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


__all__ = ["ApiError", "error_response", "error_body", "parse_data_url", "OPENAI_PATHS",
           "BodyTooLarge", "BodyLimitMiddleware", "ParsedRequest", "parse_request",
           "check_options", "validation_detail", "check_s3_uri", "fetch_uri", "decode_checked", "decoded_pixels", "DecodeBudget",
           "DECODED_BYTES_PER_PIXEL", "IMAGE_ERROR_STATUS"]
