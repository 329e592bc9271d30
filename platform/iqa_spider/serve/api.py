"""The HTTP API: the FastAPI app, its routes and its JSON errors. Reading a request within the
limits is :mod:`.requests`; the documented shapes are :mod:`.schemas`.

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
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable
from typing import Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from iqa_spider.images import header_size
from iqa_spider.infer import results as R
from iqa_spider.serve.chat import add_openai_routes
from iqa_spider.serve.config import LimitsConfig
from iqa_spider.serve.requests import (
    DECODED_BYTES_PER_PIXEL,
    ApiError,
    BodyLimitMiddleware,
    BodyTooLarge,
    DecodeBudget,
    ParsedRequest,
    check_options,
    decode_checked,
    decoded_pixels,
    error_response,
    fetch_uri,
    parse_request,
    validation_detail,
)
from iqa_spider.serve.schemas import ERROR_RESPONSES, AssessResponse, ErrorBody, request_schemas

log = logging.getLogger("ray.serve")

API_VERSION = "v1"


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
                                      {"WWW-Authenticate": "Bearer"}, path=request.url.path)
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

    # Every refusal in the shape of the route asked (OpenAI's on its compatible routes).
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers, path=request.url.path)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request: Request, exc: BodyTooLarge):
        return error_response(413, "body_too_large", str(exc), path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if any(e.get("type") == "json_invalid" for e in exc.errors()):  # a typed body that is not JSON
            return error_response(400, "malformed_json", "the body is not valid JSON", path=request.url.path)
        return error_response(422, "invalid_request", validation_detail(exc), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None),
                              path=request.url.path)

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, exc: BackendUnavailable):
        return error_response(exc.status, exc.error, exc.detail, {"Retry-After": "5"}, path=request.url.path)

    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    if api_token:
        app.middleware("http")(bearer_auth(api_token))  # outermost: refused before the body is read

    json_schema, multipart_schema = request_schemas(limits)
    budget = DecodeBudget(limits.max_decoded_mb_in_flight * 2**20)

    # Ready once the model deployment has answered. Until then a probe or a request gets the
    # JSON 503 not_ready within NOT_READY_WAIT_S, not after a model-load-long wait; afterwards
    # the probe allows a busy replica READY_PROBE_S to answer. "info": its last answer, held once
    # it has answered at all.
    readiness: dict[str, dict] = {}

    async def model_ready() -> tuple[dict | None, str | None]:
        wait = READY_PROBE_S if "info" in readiness else NOT_READY_WAIT_S
        try:
            info = await asyncio.wait_for(backend.model_info(), timeout=wait)
        except Exception as exc:  # noqa: BLE001 - starting, gone or overloaded: not ready
            return None, f"the model deployment does not answer within {wait:g}s ({type(exc).__name__}): " \
                         "it is starting (loading the model) or gone; retry"
        readiness["info"] = info
        return info, None

    async def loaded_model() -> dict:
        """What the model deployment loaded, asked once (a replica's model never changes; a new
        config redeploys the ingress too); a quick 503 not_ready while it loads."""
        if "info" not in readiness:
            _, why = await model_ready()
            if why:
                raise ApiError(503, "not_ready", why, {"Retry-After": "5"})
        return readiness["info"]

    async def _answer(parsed: ParsedRequest) -> dict:
        """One parsed request -> its result row plus the texts asked: /v1/assess's and the chat's."""
        t0 = time.perf_counter()
        check_options(parsed.options, limits)
        fit = (await loaded_model()).get("max_pixels")  # the processor's cap: decode no larger
        data = parsed.data if parsed.data is not None else await fetch_uri(parsed.uri or "", limits)
        size = header_size(data)
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
        return row

    async def in_time(work: Awaitable[dict]) -> dict:
        try:
            return await asyncio.wait_for(work, timeout=limits.request_timeout_s)
        except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two before
            raise ApiError(408, "timeout", f"the request took longer than {limits.request_timeout_s:g}s") from None

    async def answer_in_time(parsed: ParsedRequest) -> dict:
        return await in_time(_answer(parsed))

    @app.post(
        "/v1/assess",
        summary="Assess one image",
        description="Score the image (always), and on request describe it, ground questions (point + mask) and "
                    "answer referring questions about named regions. Send multipart/form-data (file field "
                    "`image`) or JSON (`image_base64` or `image_uri`).",
        response_model=None,
        responses={200: {"model": AssessResponse, "description": "a result-contract row"}, **ERROR_RESPONSES},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": json_schema},
            "multipart/form-data": {"schema": multipart_schema},
        }}},
    )
    async def assess(request: Request):
        async def parse_and_answer() -> dict:  # reading the body counts against the timeout too
            return await _answer(await parse_request(request, limits))

        return JSONResponse(await in_time(parse_and_answer()))

    add_openai_routes(app, answer_in_time, loaded_model, limits, ERROR_RESPONSES)

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


__all__ = ["build_api", "build_row", "bearer_auth", "add_offline_docs", "Backend", "BackendUnavailable", "API_VERSION",
           "API_TOKEN_ENV", "OPEN_PATHS", "NOT_READY_WAIT_S", "READY_PROBE_S"]
