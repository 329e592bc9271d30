"""What the MLflow pyfunc model (:mod:`iqa_spider.registry.pyfunc`) runs.

``mlflow.pyfunc.load_model("models:/iqa-spider@champion").predict(frame, params=...)`` ends
here: the pyfunc wrapper hands over the HF directory it logged as an artifact
(:func:`load_predictor`) and the caller's DataFrame (:func:`predict_frame`).

Input: a DataFrame with a column ``image`` (encoded bytes) and/or ``image_uri`` (any URI
that :mod:`iqa_spider.storage` reads: local, ``file://``, ``s3://``). Where a row has both,
the bytes win and the URI is reported as given.

Output: one result-contract row per input row, in input order (the columns of
:data:`iqa_spider.infer.results.RESULT_FIELDS`). A row whose image cannot be read or scored
gets ``error`` set; it never fails the call. Every column has dtype object, so a missing value
is ``None`` (never NaN) and the rows equal what batch scoring writes.

``params`` (all optional; strings such as ``"true"`` are accepted, as MLflow may pass them):

- ``describe`` (bool, default false): also write the global description;
- ``ground`` (bool, default false): also answer the HyD-G question with point(s) and mask;
- ``ground_questions`` (str or list of str): grounding questions to ask (implies ground);
- ``mapping`` (str): text-to-point mapping for this call (default: the predictor's).

Environment: ``IQA_SPIDER_DEVICE`` (auto | cpu | cuda | cuda:N, default auto) and
``IQA_SPIDER_SEGMENTER`` (a SAM checkpoint directory; default the offline superpixel
segmenter) choose where the model runs and which segmenter masks the points.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from iqa_spider import storage
from iqa_spider.config.loader import ConfigValueError, parse_bool
from iqa_spider.config.schemas import MODEL_FAMILIES, ModelConfig
from iqa_spider.infer import results as R
from iqa_spider.infer.config import HYD_QUESTION, MAPPING_NAMES, InferConfig, SegmenterConfig

log = logging.getLogger(__name__)

PARAM_KEYS = ("describe", "ground", "ground_questions", "mapping")


def _family_of(model_dir: str) -> str:
    try:
        model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return model_type if model_type in MODEL_FAMILIES else MODEL_FAMILIES[0]


def load_predictor(model_dir: str):
    """The grounding head (predictor + segmenter) for the HF directory ``model_dir``.

    Scoring, descriptions and grounding all go through it; batching and prefix sharing are
    the engine's defaults.
    """
    from iqa_spider.infer.predictor import GroundingHead

    device = os.environ.get("IQA_SPIDER_DEVICE", "auto")
    sam = os.environ.get("IQA_SPIDER_SEGMENTER")
    segmenter = SegmenterConfig(kind="sam", path=sam, device=device) if sam else SegmenterConfig()
    model_cfg = ModelConfig(family=_family_of(model_dir), path=str(model_dir), device=device)
    return GroundingHead.from_config(model_cfg, InferConfig(describe=False, ground_questions=[]), segmenter)


def _flag(params: dict, key: str, default: bool = False) -> bool:
    """A boolean param, read as everywhere (`parse_bool`); absent, null or empty: ``default``."""
    value = params.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        return parse_bool(value, key)
    except ConfigValueError as exc:
        raise ValueError(f"param {key!r} must be a boolean: {exc}") from None


def _questions(params: dict) -> list[str]:
    qs = params.get("ground_questions")
    if qs is None or (isinstance(qs, str) and not qs.strip()):
        return [HYD_QUESTION] if _flag(params, "ground") else []
    if isinstance(qs, str):
        qs = qs.strip()
        if qs.startswith("["):  # a JSON list passed as a string
            qs = json.loads(qs)
        else:
            return [qs]
    return [str(q) for q in qs]


def _cell(value: Any) -> Any:
    """A DataFrame cell as a plain value (pandas NA / NaN -> None)."""
    if value is None:
        return None
    try:
        import pandas as pd

        if not isinstance(value, (bytes, bytearray, memoryview, list, tuple)) and pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value


def predict_frame(predictor, model_input, params: dict | None = None):
    """Result-contract rows (a DataFrame) for the images of ``model_input``; see the module doc."""
    import pandas as pd

    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown params {unknown}; expected some of {', '.join(PARAM_KEYS)}")
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(model_input).__name__}")
    if "image" not in model_input.columns and "image_uri" not in model_input.columns:
        raise ValueError("the input needs a column 'image' (bytes) or 'image_uri'")
    describe = _flag(params, "describe")
    questions = _questions(params)
    mapping = params.get("mapping") or None  # MLflow sends the signature default "" when unset
    if mapping is not None and mapping not in MAPPING_NAMES:
        raise ValueError(f"param 'mapping' must be one of {', '.join(MAPPING_NAMES)}, got {mapping!r}")

    n = len(model_input)
    images = model_input["image"].tolist() if "image" in model_input.columns else [None] * n
    uris = model_input["image_uri"].tolist() if "image_uri" in model_input.columns else [None] * n
    meta = {"model_uri": predictor.predictor.model_uri, "model_version": predictor.predictor.model_version}
    rows: list[dict | None] = [None] * n
    items: list[tuple[str | None, bytes]] = []
    where: list[int] = []
    for i, (data, uri) in enumerate(zip(images, uris)):
        data, uri = _cell(data), _cell(uri)
        uri = None if uri is None else str(uri)
        if data is None and uri is None:
            rows[i] = R.error_row(None, hashlib.sha256(b"").hexdigest(), "no_input: neither image nor image_uri",
                                  **meta)
            continue
        if data is None:
            try:
                data = storage.read_bytes(uri)
            except Exception as exc:  # noqa: BLE001 - a missing or unreadable object costs its own row
                rows[i] = R.error_row(uri, hashlib.sha256(b"").hexdigest(),
                                      f"unreadable: {type(exc).__name__}: {exc}"[:500], **meta)
                continue
        items.append((uri, bytes(data)))
        where.append(i)

    # the mapping goes with the call, not into the config: concurrent calls share the predictor
    scored = predictor.predict_rows(items, describe=describe, ground_questions=questions,
                                    mapping=mapping) if items else []
    for i, row in zip(where, scored):
        rows[i] = row
    # object columns keep None as None (a float column would turn a missing score into NaN,
    # and pandas would turn a missing error into NaN too)
    return pd.DataFrame({c: pd.Series([r[c] for r in rows], dtype=object) for c in R.RESULT_FIELDS},
                        index=model_input.index)


__all__ = ["load_predictor", "predict_frame", "PARAM_KEYS"]
