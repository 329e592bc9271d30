"""The API's documented shapes: the request options and bodies, the response (one
result-contract row, generated from `infer.results.RESULT_SCHEMA`, plus the referring and local
answers), the error body, and the OpenAPI request schemas with this deployment's limits."""
from __future__ import annotations

import logging
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, create_model

from iqa_spider.infer import results as R
from iqa_spider.infer.config import HYD_QUESTION, MAPPING_NAMES
from iqa_spider.infer.planning import Ask
from iqa_spider.serve.config import LimitsConfig

log = logging.getLogger("ray.serve")

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


class TextAnswer(BaseModel):
    region: str
    query: str
    answer: str


def _annotation(t: pa.DataType, struct_model: type[BaseModel] | None = None) -> Any:
    """The Python type of a result field's pyarrow type, as it is in JSON."""
    if pa.types.is_string(t) or pa.types.is_timestamp(t):  # timestamps are ISO 8601 text (row_to_json)
        return str
    if pa.types.is_integer(t):
        return int
    if pa.types.is_floating(t):
        return float
    if pa.types.is_struct(t):
        return struct_model or dict[str, Any]
    if pa.types.is_list(t):
        return list[_annotation(t.value_type, struct_model)]
    raise TypeError(f"the result contract has a field of type {t} that the API has no JSON type for")


def model_fields(fields: list[pa.Field], struct_model: type[BaseModel] | None = None) -> dict[str, Any]:
    """pydantic field definitions of pyarrow fields: a nullable one is optional (default null), a
    non-null list defaults to [], any other non-null one is required; descriptions from metadata."""
    out: dict[str, Any] = {}
    for f in fields:
        annotation = _annotation(f.type, struct_model)
        description = (f.metadata or {}).get(b"description", b"").decode() or None
        if f.nullable:
            out[f.name] = (annotation | None, Field(None, description=description))
        elif pa.types.is_list(f.type):
            out[f.name] = (annotation, Field(default_factory=list, description=description))
        else:
            out[f.name] = (annotation, Field(..., description=description))
    return out


# The response models are generated from the Parquet schema, so the two cannot drift apart.
RegionOut = create_model("RegionOut", __doc__="One point of a grounding answer, with its mask.",
                         **model_fields([R.REGION_RESULT.field(i) for i in range(R.REGION_RESULT.num_fields)]))
AssessResponse = create_model(
    "AssessResponse", __doc__="One row of the result contract (docs/architecture.md), plus the referring and "
                              "local answers of the request.",
    **model_fields(list(R.RESULT_SCHEMA), struct_model=RegionOut),
    referring=(list[TextAnswer], Field(default_factory=list, description="answers to `refer`")),
    local_descriptions=(list[TextAnswer], Field(default_factory=list, description="answers to `describe_regions`")))


class ErrorBody(BaseModel):
    error: str = Field(..., description="short stable code, e.g. body_too_large, not_an_image")
    detail: str = Field(..., description="why, in words")
    status: int


ERROR_RESPONSES = {code: {"model": ErrorBody, "description": text} for code, text in {
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


__all__ = ["AssessOptions", "AssessJSON", "AssessResponse", "RegionOut", "TextAnswer", "ErrorBody", "ERROR_RESPONSES",
           "IMAGE_FIELDS", "S3_URI_PATTERN", "MappingName", "request_schemas"]
