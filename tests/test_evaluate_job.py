"""The evaluation harness end to end: an annotated dataset (real annotation job on a local Ray),
the tiny model, the offline segmenter; report files and MLflow metrics (real `mlflow server`)."""
import json
import math
import os

import pytest

from iqa_spider.config import load_config
from iqa_spider.infer.config import MAPPING_NAMES, EvaluateConfig
from conftest import REPO



@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    from iqa_spider.annotate.pipeline import run_annotate, write_builtin_photos
    from iqa_spider.config.schemas import AnnotateConfig

    root = tmp_path_factory.mktemp("evaluate")
    write_builtin_photos(str(root / "photos"), limit=2)
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={root / 'photos'}", f"output.uri={root / 'data'}", "distort.max_side=128",
                       "distort.variants_per_image=2", "test_fraction=1.0"])
    run_annotate(cfg)
    return str(root / "data")


def eval_config(model_dir, data_uri, *extra):
    return load_config(EvaluateConfig, REPO / "configs/evaluate.yaml",
                       [f"model.path={model_dir}", f"data.uri={data_uri}", "model.device=cpu",
                        "infer.max_new_tokens=12", "infer.describe_max_new_tokens=16", *extra])


@pytest.fixture(scope="module")
def report(dataset, tiny_model_dir, mlflow_server, tmp_path_factory):
    from iqa_spider.infer.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval_out")
    cfg = eval_config(tiny_model_dir, dataset, f"output.uri={out}", "mlflow.experiment=eval-test")
    return evaluate(cfg), out


def in_unit(value):
    return math.isfinite(value) and -1e-9 <= value <= 1 + 1e-9


def test_every_metric_exists_is_finite_and_in_range(report):
    from iqa_spider.infer.metrics import flatten_metrics

    rep, _ = report
    m = rep["metrics"]
    assert {"rating", "grounding", "referring_short", "referring_long", "global_desc", "local_desc"} <= set(m)
    assert rep["images"] == 4 and rep["samples"] > 0 and rep["skipped_samples"] == {}
    for key in ("srcc", "plcc", "plcc_linear"):
        assert math.isfinite(m["rating"][key]) and -1 - 1e-9 <= m["rating"][key] <= 1 + 1e-9, key
    g = m["grounding"]["all"]
    for key in ("point_acc", "miou", "position_acc", "whole_image_acc"):
        assert in_unit(g[key]), key
    assert set(g["mapping"]) == set(MAPPING_NAMES) == set(g["forced"])
    for which in ("mapping", "forced"):
        for name, d in g[which].items():
            assert in_unit(d["point_acc"]) and in_unit(d["miou"]), (which, name)
    for task in ("referring_short", "referring_long"):
        for key in ("type_precision", "type_recall", "type_f1", "pair_f1", "exact_match"):
            assert in_unit(m[task][key]), (task, key)
    for key in ("type_f1", "position_f1", "level_acc"):
        assert in_unit(m["global_desc"][key]), key
    flat = flatten_metrics(m)
    assert all(math.isfinite(v) for v in flat.values())
    assert m["grounding"]["all"]["n"] == sum(m["grounding"][s]["n"] for s in ("hyd", "sid", "dao") if s in m["grounding"])


def test_report_files(report, dataset):
    import pyarrow.parquet as pq

    from iqa_spider.data.io import read_dataset

    rep, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"]["grounding"]["all"]["n"] == rep["metrics"]["grounding"]["all"]["n"]
    preds = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(preds) == rep["samples"]
    # one prediction per test sample of the dataset, none twice
    test_rows = [r for r in read_dataset(dataset).to_pylist() if r["split"] == "test"]
    assert sorted(p["sample_id"] for p in preds) == sorted(r["sample_id"] for r in test_rows)
    assert {p["task"] for p in preds} == {r["task"] for r in test_rows} >= {"rating", "grounding"}
    # the reported grounding numbers are the means of the per-sample rows written next to them
    g = on_disk["metrics"]["grounding"]
    for sub in ("all", "hyd", "sid", "dao"):
        rows = [p for p in preds if p["task"] == "grounding" and sub in ("all", p["subtask"])]
        if sub not in g:
            assert not rows, sub
            continue
        assert rows and g[sub]["n"] == len(rows), sub
        assert all(p["hit"] in (0.0, 1.0) for p in rows)
        assert g[sub]["point_acc"] == pytest.approx(sum(p["hit"] for p in rows) / len(rows), abs=1e-12), sub
        assert g[sub]["position_acc"] == pytest.approx(sum(p["position_ok"] for p in rows) / len(rows), abs=1e-12)
    assert "all" in g and "hyd" in g
    html = (out / "report.html").read_text()
    assert html.count("<figure>") == rep["metrics"]["grounding"]["all"]["n"] and "data:image/png;base64," in html


def test_metrics_are_logged_to_mlflow(report, mlflow_server):
    from mlflow import MlflowClient

    rep, _ = report
    run = MlflowClient().get_run(rep["mlflow_run_id"])
    assert run.data.metrics["grounding.all.n"] == rep["metrics"]["grounding"]["all"]["n"]
    assert "rating.srcc" in run.data.metrics
    assert run.data.params["mapping"] == "expected_bin_centre"
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/report.json" in names and "evaluation/report.html" in names


def test_rating_only_dataset(dataset, tiny_model_dir):
    """A MOS table imported as rating samples gets rating metrics only."""
    from iqa_spider.infer.evaluate import evaluate

    rep = evaluate(eval_config(tiny_model_dir, dataset, "data.tasks=[rating]", "mlflow.enabled=false"))
    assert set(rep["metrics"]) == {"rating"} and rep["metrics"]["rating"]["n"] == 4


def test_job_entrypoint(dataset, tiny_model_dir, tmp_path, capsys, caplog):
    import subprocess
    import sys

    from iqa_spider.infer.evaluate import main

    # a bad config fails before anything loads, naming the key
    bad = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--config", str(REPO / "configs/evaluate.yaml"),
                          f"model.path={tiny_model_dir}", f"data.uri={dataset}", "infer.mapping=nearest"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert bad.returncode == 2 and "infer.mapping" in bad.stderr
    caplog.set_level("INFO", logger="iqa_spider.infer.evaluate")
    code = main(["--config", str(REPO / "configs/evaluate.yaml"), f"model.path={tiny_model_dir}",
                 f"data.uri={dataset}", "model.device=cpu", "data.max_images=1", "infer.max_new_tokens=4",
                 "infer.describe_max_new_tokens=4", "mlflow.enabled=false", f"output.uri={tmp_path / 'r'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "evaluate: 1/1 images" in caplog.text  # progress, chunk by chunk
    written = json.loads((tmp_path / "r" / "report.json").read_text())
    assert written["images"] == 1 and written["data_uri"] == dataset and written["split"] == "test"
    assert written["mapping"] == "expected_bin_centre" and written["model_uri"]
    # the samples of the one (first, by image_id) test image
    from iqa_spider.data.io import read_dataset

    test_rows = [r for r in read_dataset(dataset).to_pylist() if r["split"] == "test"]
    first = min(r["image_id"] for r in test_rows)
    assert written["samples"] == sum(r["image_id"] == first for r in test_rows) > 0
    # the printed metrics are the report's, value for value
    from iqa_spider.infer.metrics import flatten_metrics

    printed = dict(line.rsplit(None, 1) for line in out.splitlines() if line.startswith("grounding."))
    flat = flatten_metrics(written["metrics"])
    assert "grounding.all.point_acc" in printed
    for key, value in printed.items():
        assert float(value) == pytest.approx(flat[key], abs=5e-5), key
