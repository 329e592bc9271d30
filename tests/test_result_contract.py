"""The result contract has one schema (`infer.results.RESULT_SCHEMA`, Parquet) and one row
builder (`result_row`); the Serve API's pydantic response is generated from the schema. These
tests check that the generated model agrees with the schema field by field (name, order, type,
nullability), that a new schema field reaches the API, and that the builder fills every field."""
import types
import typing

import pyarrow as pa

from iqa_spider.infer import results as R
from iqa_spider.serve.schemas import AssessResponse, RegionOut, model_fields

# Serve-only extras after the contract's fields: the referring and local answers of a request.
SERVE_EXTRAS = ["referring", "local_descriptions"]


def python_type(t: pa.DataType, struct_model=None):
    """The pydantic annotation (without None) that a pyarrow type corresponds to."""
    if pa.types.is_string(t):
        return str
    if pa.types.is_integer(t):
        return int
    if pa.types.is_floating(t):
        return float
    if pa.types.is_timestamp(t):
        return str  # ISO 8601 in JSON (`row_to_json`)
    if pa.types.is_struct(t):
        return struct_model or dict[str, typing.Any]
    if pa.types.is_list(t):
        return list[python_type(t.value_type, struct_model)]
    raise AssertionError(f"no mapping for {t}")


def without_none(annotation):
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation, True
    return annotation, False


def check_agree(arrow_fields, model, struct_model=None):
    assert list(model.model_fields)[:len(arrow_fields)] == [f.name for f in arrow_fields]
    for f in arrow_fields:
        annotation, allows_none = without_none(model.model_fields[f.name].annotation)
        assert annotation == python_type(f.type, struct_model), (f.name, annotation, f.type)
        if not pa.types.is_list(f.type):  # lists are [] rather than null in both
            assert allows_none == f.nullable, f.name


def test_serve_response_and_parquet_schema_agree_field_by_field():
    check_agree(list(R.RESULT_SCHEMA), AssessResponse, struct_model=RegionOut)
    assert list(AssessResponse.model_fields) == list(R.RESULT_FIELDS) + SERVE_EXTRAS
    region_fields = [R.REGION_RESULT.field(i) for i in range(R.REGION_RESULT.num_fields)]
    check_agree(region_fields, RegionOut)
    assert list(RegionOut.model_fields) == [f.name for f in region_fields]


def test_the_one_builder_makes_every_field_and_a_valid_table():
    score = {"score": 3.5, "level": "fair", "level_probs": [0.1, 0.2, 0.4, 0.2, 0.1]}
    ok = R.result_row("s3://b/k.png", "ab" * 32, 64, 48, score=score, description="Sharp.", model_version=3)
    bad = R.error_row("s3://b/x.png", "cd" * 32, "corrupt: not an image")
    for row in (ok, bad):
        assert list(row) == list(R.RESULT_FIELDS)
        assert R.check_row(row) == []
    assert ok["model_version"] == "3" and ok["error"] is None and ok["level_probs"][2] == 0.4
    assert bad["score"] is None and bad["regions"] == [] and bad["error"].startswith("corrupt")
    table = R.rows_to_table([ok, bad])
    assert table.schema == R.RESULT_SCHEMA and table.num_rows == 2
    AssessResponse(**R.row_to_json(ok))  # the JSON form validates against the API's model


def test_a_field_added_to_the_schema_reaches_the_api_model():
    extended = [*R.RESULT_SCHEMA, pa.field("sharpness", pa.float32(), metadata={"description": "0..1"})]
    fields = model_fields(extended)
    annotation, spec = fields["sharpness"]
    assert list(fields)[-1] == "sharpness" and annotation == float | None and spec.description == "0..1"
