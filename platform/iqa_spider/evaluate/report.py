"""The outputs of an evaluation: ``report.json`` (metrics, chance baselines, control flag,
counts, provenance), ``predictions.parquet`` (one row per sample, prediction beside truth),
``report.html`` (summary table with chance, the plots of :mod:`iqa_spider.evaluate.plots` as
``plots/*.png`` next to it, the full metrics table; image, truth mask, predicted point and mask
overlaid for grounding samples) under ``output.uri``, MLflow metrics and artifacts (the same
folder, under ``evaluation/``), and the printed metrics table.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from iqa_spider import storage
from iqa_spider.data.io import write_table
from iqa_spider.evaluate.config import EvaluateConfig
from iqa_spider.evaluate.metrics import STRATA, answer_level, distortion_families, flatten_metrics
from iqa_spider.evaluate.plots import write_plots
from iqa_spider.model.loading import registered_name
from iqa_spider.templating import html_templates
from iqa_spider.tracking import experiment_id, redact_values, tracking_uri


def publish(cfg: EvaluateConfig, report: dict, samples: Sequence[dict], drawn: Sequence[dict]) -> None:
    """Write the report files (to ``output.uri`` when set) and log to MLflow (when enabled); sets
    ``output_uri`` / ``mlflow_run_id`` in ``report``. The local copy only feeds those two, and
    promotions evaluate often, so it is removed; with neither, nothing is rendered at all."""
    if not cfg.output.uri and not mlflow_enabled(cfg):
        return
    try:
        _write_outputs(cfg, report, samples, drawn)
        _log_mlflow(cfg, report)
    finally:
        shutil.rmtree(report.pop("_local_dir", ""), ignore_errors=True)


def _overlay_png(item: dict, max_side: int = 256) -> str:
    from PIL import Image, ImageDraw

    img = item["image"].convert("RGB")
    arr = np.asarray(img).astype(np.float32)
    tm = item["truth_mask"]
    arr[tm] = 0.55 * arr[tm] + 0.45 * np.array([40, 220, 40])      # truth: green
    pm = item.get("mask")
    if pm is not None:
        arr[pm] = 0.6 * arr[pm] + 0.4 * np.array([230, 40, 40])    # prediction: red
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(2, round(max(out.size) / 60))
    for x, y in item["points"]:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=(30, 80, 255), outline=(255, 255, 255))
    scale = min(1.0, max_side / max(out.size))
    if scale < 1.0:
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# The summary table of report.html: (section, metric) per task, shown when measured.
SUMMARY_KEYS = (("rating", "srcc"), ("rating", "plcc"), ("rating", "level_acc"),
                *((f"grounding.{sub}", key) for sub in ("hyd", "sid", "dao", "all")
                  for key in ("point_acc", "miou", "position_acc")),
                ("referring_short", "type_acc"), ("referring_short", "type_f1"),
                ("referring_long", "type_acc"), ("referring_long", "type_f1"),
                ("global_desc", "type_f1"), ("global_desc", "position_f1"), ("global_desc", "level_acc"),
                ("local_desc", "type_f1"),
                # per stratum of the truth (strong whole-image damage is learnt first): rows only where present
                *((f"{task}.by_stratum.{s}", key) for task, key in (("referring_short", "type_acc"),
                                                                    ("global_desc", "type_f1")) for s in STRATA))


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _summary_rows(report: dict) -> list[dict]:
    flat = flatten_metrics(report["metrics"])
    chance = flatten_metrics(report.get("chance") or {})
    basis = report.get("chance_basis") or {}
    rows = []
    for section, key in SUMMARY_KEYS:
        k = f"{section}.{key}"
        if k in flat:
            rows.append({"section": section, "key": key, "model": _fmt(flat[k]), "chance": _fmt(chance.get(k)),
                         "n": f"{flat.get(section + '.n', 0):.0f}", "basis": basis.get(k, "")})
    return rows


TEMPLATES = html_templates("iqa_spider.evaluate")


def render_html(report: dict, drawn: Sequence[dict], plots: Sequence[tuple[str, str]] = ()) -> str:
    """The page; ``plots`` are ``(file name, caption)`` of PNGs in ``plots/`` next to it."""
    chance = flatten_metrics(report.get("chance") or {})
    metrics = [{"key": k, "model": f"{v:.4f}", "chance": _fmt(chance.get(k))}
               for k, v in sorted(flatten_metrics(report["metrics"]).items())]
    cards = [{"png": _overlay_png(it), "subtask": it["subtask"] or "", "question": it["question"], "truth": it["truth"],
              "pred": it["pred"] or "", "hit": f"{it['hit']:.0f}", "iou": f"{it['iou']:.3f}"} for it in drawn]
    return TEMPLATES.get_template("report.html.j2").render(
        report=report, control=report.get("control") or {}, summary=_summary_rows(report), plots=list(plots),
        metrics=metrics, cards=cards)


def _predictions_table(samples: Sequence[dict], mapping: str):
    """One row per sample, the prediction beside its truth; `hit` / `iou` are under `mapping`,
    the configured one. `shown_image_id` is the image the model saw (another one in the
    shuffled-image control)."""
    import pyarrow as pa

    strs = pa.list_(pa.string())
    schema = pa.schema([
        ("sample_id", pa.string()), ("image_id", pa.string()), ("shown_image_id", pa.string()),
        ("task", pa.string()), ("subtask", pa.string()), ("question", pa.string()),
        ("truth", pa.string()), ("pred", pa.string()),
        # truth
        ("target_score", pa.float64()), ("target_level", pa.string()), ("truth_families", strs),
        ("truth_pairs", strs), ("truth_positions", strs), ("truth_position", pa.string()),
        ("truth_whole", pa.bool_()), ("truth_area_frac", pa.float64()),
        ("truth_stratum", pa.string()),
        # prediction
        ("score", pa.float64()), ("level", pa.string()), ("pred_families", strs), ("pred_level", pa.string()),
        ("whole_image", pa.bool_()), ("point_x", pa.float64()), ("point_y", pa.float64()),
        ("position_ok", pa.float64()), ("hit", pa.float64()), ("iou", pa.float64())])
    rows = []
    for s in samples:
        r = {f.name: s.get(f.name) for f in schema}
        r["hit"], r["iou"] = s.get(f"mapping.{mapping}.hit"), s.get(f"mapping.{mapping}.iou")
        if s.get("pred") is not None:
            r["pred_families"] = sorted(distortion_families(s["pred"]))
            r["pred_level"] = answer_level(s["pred"])
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=schema)


def _write_outputs(cfg: EvaluateConfig, report: dict, samples: Sequence[dict], drawn: Sequence[dict]) -> None:
    """report.json, predictions.parquet and report.html into a local folder, then to output.uri."""

    local = tempfile.mkdtemp(prefix="iqa-eval-")
    report["_local_dir"] = local
    plots = write_plots(report, samples, os.path.join(local, "plots")) if cfg.output.plots else []
    report["plots"] = [f"plots/{name}" for name, _ in plots]
    files = {"report.json": json.dumps(_jsonable(report), indent=2).encode()}
    if cfg.output.html:
        files["report.html"] = render_html(report, drawn, plots).encode()
    for name, data in files.items():
        with open(os.path.join(local, name), "wb") as f:
            f.write(data)
    write_table(_predictions_table(samples, cfg.infer.mapping), os.path.join(local, "predictions.parquet"))
    if cfg.output.uri:
        for folder, _, names in os.walk(local):
            for name in sorted(names):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(cfg.output.uri, rel), f.read())
        report["output_uri"] = cfg.output.uri


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def mlflow_enabled(cfg: EvaluateConfig) -> bool:
    if cfg.mlflow.enabled == "true":
        return True
    return cfg.mlflow.enabled == "auto" and bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _log_mlflow(cfg: EvaluateConfig, report: dict) -> None:
    if not mlflow_enabled(cfg):
        return
    import mlflow
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    # The client API, not mlflow.set_experiment/start_run: those change process-wide state
    # that later runs of other jobs in the same process (promotion, training) trip over.
    client = MlflowClient(tracking_uri())
    parent = mlflow.active_run()
    tags = {"mlflow.parentRunId": parent.info.run_id} if parent else {}
    control = report.get("control") or {}
    # A registered version is named and tagged after itself, so MLflow shows which one was measured.
    registered, version = registered_name(report["model_uri"] or ""), report["model_version"]
    run_name = cfg.mlflow.run_name
    if registered and version is not None:
        tags.update({"registered_model": registered, "model_version": str(version)})
        run_name = run_name or f"eval-{registered}-v{version}" + ("-shuffled" if control.get("shuffle_images") else "")
    run_id = client.create_run(experiment_id(client, cfg.mlflow.experiment), run_name=run_name,
                               tags=tags).info.run_id
    params = redact_values({"model_uri": report["model_uri"], "model_version": report["model_version"],
                            "data_uri": report["data_uri"], "split": report["split"], "mapping": report["mapping"],
                            "tau": report["tau"], "segmenter": report["segmenter"],
                            "shuffle_images": bool(control.get("shuffle_images"))})
    metrics = {**flatten_metrics(report["metrics"]), **flatten_metrics(report.get("chance") or {}, "chance."),
               "eval.images": float(report["images"]), "eval.samples": float(report["samples"])}
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("iqa_spider.control", "shuffled_images" if control.get("shuffle_images") else "none")])
    for i in range(0, len(batch), 900):   # a batch holds at most 1000 metrics
        client.log_batch(run_id, metrics=batch[i:i + 900])
    if report.get("_local_dir"):
        client.log_artifacts(run_id, report["_local_dir"], artifact_path="evaluation")
    client.set_terminated(run_id, "FINISHED")
    report["mlflow_run_id"] = run_id


def format_metrics(metrics: dict) -> str:
    flat = flatten_metrics(metrics)
    width = max((len(k) for k in flat), default=10)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in sorted(flat.items()))
