"""The evaluation harness end to end: an annotated dataset (real annotation job on a local Ray),
the tiny model, the offline segmenter; report files and MLflow metrics (real `mlflow server`)."""
import json
import math
import os

import pytest

from conftest import REPO
from iqa_spider.config import load_config
from iqa_spider.evaluate.config import EvaluateConfig
from iqa_spider.infer.config import MAPPING_NAMES


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
    from iqa_spider.evaluate.job import evaluate

    out = tmp_path_factory.mktemp("eval_out")
    cfg = eval_config(tiny_model_dir, dataset, f"output.uri={out}", "mlflow.experiment=eval-test")
    return evaluate(cfg), out


def in_unit(value):
    return math.isfinite(value) and -1e-9 <= value <= 1 + 1e-9


def test_every_metric_exists_is_finite_and_in_range(report):
    from iqa_spider.evaluate.metrics import flatten_metrics

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
    assert on_disk["control"] == {"shuffle_images": False}


def test_report_plots_are_pngs_the_html_shows(report):
    import re

    from PIL import Image

    rep, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["plots"] == ["plots/score_scatter.png", "plots/confusion_referring_short.png",
                                "plots/grounding_mappings.png"]
    html = (out / "report.html").read_text()
    assert re.findall(r"<img src='(plots/[^']+)'", html) == on_disk["plots"]
    for rel in on_disk["plots"]:
        data = (out / rel).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), rel
        with Image.open(out / rel) as im:
            im.verify()
            assert im.format == "PNG" and min(im.size) >= 200, rel
    # the summary puts chance beside each key metric
    assert "<th>chance</th>" in html and "referring_short</td><td>type_acc" in html


def test_chance_baselines_in_the_report(report):
    rep, out = report
    on_disk = json.loads((out / "report.json").read_text())
    chance, basis = on_disk["chance"], on_disk["chance_basis"]
    m = on_disk["metrics"]
    assert chance["rating"]["srcc"] == 0.0
    for key in ("point_acc", "miou", "position_acc"):
        assert in_unit(chance["grounding"]["hyd"][key]), key
    assert set(chance["grounding"]["hyd"]["mapping"]) == set(m["grounding"]["hyd"]["mapping"])
    assert in_unit(chance["referring_short"]["type_acc"]) and in_unit(chance["global_desc"]["type_f1"])
    assert "most frequent" in basis["referring_short.type_acc"]
    # keys match the metric keys
    from iqa_spider.evaluate.metrics import flatten_metrics

    assert set(flatten_metrics(chance)) <= set(flatten_metrics(m))
    assert in_unit(m["referring_short"]["type_acc"])


def test_predictions_carry_the_truth(report, dataset):
    import pyarrow.parquet as pq

    from iqa_spider.data.io import read_dataset
    from iqa_spider.evaluate.metrics import STRATA, target_mask, target_regions, truth_families, truth_stratum

    rep, out = report
    preds = {p["sample_id"]: p for p in pq.read_table(out / "predictions.parquet").to_pylist()}
    truth = {r["sample_id"]: r for r in read_dataset(dataset).to_pylist() if r["split"] == "test"}
    for sid, p in preds.items():
        row, target = truth[sid], truth[sid]["target"]
        assert p["shown_image_id"] == p["image_id"] == row["image_id"]
        assert p["target_level"] == target["quality_level"]
        assert p["target_score"] == pytest.approx(target["quality_score"])
        if p["task"] == "rating":
            assert p["score"] is not None and p["level"] is not None
            continue
        assert p["truth_families"] == sorted(truth_families(target_regions(target)))
        assert p["truth_stratum"] == truth_stratum(target_regions(target), row["width"], row["height"])
        assert p["pred_families"] is not None
        if p["task"] == "grounding":
            regions = target_regions(target)
            assert p["truth_whole"] == target["whole_image"]
            assert p["truth_position"] == ("whole image" if target["whole_image"] else " ".join(regions[0]["position"]))
            assert p["truth_area_frac"] == pytest.approx(target_mask(target, row["width"], row["height"]).mean())
            assert p["iou"] is not None and 0 <= p["iou"] <= 1
    # every referring sample falls in exactly one stratum of the truth, and each has its chance
    ref = rep["metrics"]["referring_short"]
    assert set(ref["by_stratum"]) <= set(STRATA) and sum(v["n"] for v in ref["by_stratum"].values()) == ref["n"]
    assert set(rep["chance"]["referring_short"]["by_stratum"]) == set(ref["by_stratum"])
    html = (out / "report.html").read_text()   # the summary table has a row per stratum present
    assert all(f"referring_short.by_stratum.{s}" in html for s in ref["by_stratum"])


def test_shuffled_donors_is_a_seeded_derangement_across_sources():
    from iqa_spider.evaluate.job import shuffled_donors

    sources = list("aabbbccd")
    d = shuffled_donors(sources, 3)
    assert sorted(d) == list(range(8)) and all(d[i] != i for i in range(8))
    assert all(sources[i] != sources[j] for i, j in enumerate(d))   # the largest source holds <= half
    assert d == shuffled_donors(sources, 3) and d != shuffled_donors(sources, 4)
    one = shuffled_donors(["a"] * 3, 0)                              # one source: still no fixed point
    assert sorted(one) == [0, 1, 2] and all(one[i] != i for i in range(3))
    with pytest.raises(ValueError, match="at least 2 images"):
        shuffled_donors(["a"], 0)


def test_shuffled_image_control(report, dataset, tiny_model_dir, tmp_path):
    """Every sample is asked about another image (its donor's, at its own size); questions,
    truth and chance are those of the normal run."""
    import hashlib

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from iqa_spider.data.io import read_dataset
    from iqa_spider.evaluate.job import _image_of, evaluate
    from iqa_spider.images import prepare_image
    from iqa_spider.infer.predictor import GroundingHead

    tasks = "data.tasks=[rating,grounding,referring_short]"
    cfg = eval_config(tiny_model_dir, dataset, "data.shuffle_images=true", tasks, "mlflow.enabled=false",
                      f"output.uri={tmp_path}", "output.plots=false", "infer.max_new_tokens=6")
    head = GroundingHead.from_config(cfg.model, cfg.infer, cfg.segmenter)
    seen = []
    run = head.predictor.run

    def spy(images, queries):
        seen.extend(hashlib.sha256(np.asarray(im).tobytes()).hexdigest() for im in images)
        return run(images, queries)

    head.predictor.run = spy
    rep = evaluate(cfg, head=head)
    assert rep["control"] == {"shuffle_images": True, "seed": 0, "images": 4, "same_source_pairs": 0}
    assert json.loads((tmp_path / "report.json").read_text())["control"]["shuffle_images"] is True
    assert "CONTROL RUN" in (tmp_path / "report.html").read_text()

    rows = [r for r in read_dataset(dataset).to_pylist() if r["split"] == "test"]
    first = {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        first.setdefault(r["image_id"], r)
    preds = pq.read_table(tmp_path / "predictions.parquet").to_pylist()
    donor = {p["image_id"]: p["shown_image_id"] for p in preds}
    # a permutation of the images with no fixed point, and never the same source photo here
    assert sorted(donor) == sorted(donor.values()) == sorted(first) and all(k != v for k, v in donor.items())
    assert all(first[k]["source_uri"] != first[v]["source_uri"] for k, v in donor.items())

    def pixels(image_id, size):
        img = prepare_image(_image_of(first[image_id]))
        img = img if img.size == size else img.resize(size, Image.Resampling.BILINEAR)
        return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()

    # the model saw exactly the donors' images, each at the size of the image it stands for
    assert seen == [pixels(donor[i], (first[i]["width"], first[i]["height"])) for i in sorted(first)]
    # nothing else changed: same samples, questions and truth as the normal run, same chance
    normal, out = report
    base = {p["sample_id"]: p for p in pq.read_table(out / "predictions.parquet").to_pylist()}
    assert len(preds) == sum(p["task"] in ("rating", "grounding", "referring_short") for p in base.values())
    truth_cols = ("image_id", "task", "subtask", "question", "truth", "target_score", "target_level",
                  "truth_families", "truth_pairs", "truth_positions", "truth_position", "truth_whole",
                  "truth_area_frac", "truth_stratum")
    for p in preds:
        assert {c: p[c] for c in truth_cols} == {c: base[p["sample_id"]][c] for c in truth_cols}
    for task in ("rating", "grounding", "referring_short"):
        assert rep["chance"][task] == normal["chance"][task], task


def test_metrics_are_logged_to_mlflow(report, mlflow_server):
    from mlflow import MlflowClient

    rep, _ = report
    run = MlflowClient().get_run(rep["mlflow_run_id"])
    assert run.data.metrics["grounding.all.n"] == rep["metrics"]["grounding"]["all"]["n"]
    assert "rating.srcc" in run.data.metrics
    assert run.data.params["mapping"] == "paper"
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/report.json" in names and "evaluation/report.html" in names
    # the report's plots, the same PNGs, logged beside it
    plots = {a.path: a.file_size for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation/plots")}
    assert set(plots) == {f"evaluation/{p}" for p in rep["plots"]} and len(plots) == 3
    for path in plots:
        local = MlflowClient().download_artifacts(run.info.run_id, path)
        with open(local, "rb") as f:
            assert f.read() == (report[1] / path.removeprefix("evaluation/")).read_bytes(), path
    assert run.data.params["shuffle_images"] == "False" and run.data.tags["iqa_spider.control"] == "none"
    assert run.data.metrics["chance.rating.srcc"] == 0.0 and "chance.grounding.hyd.point_acc" in run.data.metrics


def test_a_registered_versions_evaluation_run_is_named_and_tagged_after_it(dataset, tiny_model_dir, mlflow_server,
                                                                         tmp_path):
    """So MLflow's run list shows which version was measured (and the shuffled control apart)."""
    from mlflow import MlflowClient

    from conftest import register_model
    from iqa_spider.evaluate.job import evaluate

    client = MlflowClient(mlflow_server.uri)
    version = register_model(client, "eval-naming", tiny_model_dir, "eval-naming-train")
    base = ("data.tasks=[rating]", "data.max_images=2", "mlflow.enabled=true", "mlflow.experiment=eval-naming",
            f"infer.cache_dir={tmp_path / 'cache'}", f"output.uri={tmp_path / 'out'}")
    rep = evaluate(eval_config(f"models:/eval-naming/{version}", dataset, *base, "data.shuffle_images=true"))
    run = client.get_run(rep["mlflow_run_id"])
    assert run.info.run_name == f"eval-eval-naming-v{version}-shuffled"  # the control, named apart
    assert (run.data.tags["registered_model"], run.data.tags["model_version"]) == ("eval-naming", str(version))
    # a folder is not a registered version: no such tags, and MLflow's own name
    run = client.get_run(evaluate(eval_config(tiny_model_dir, dataset, *base))["mlflow_run_id"])
    assert "registered_model" not in run.data.tags and not run.info.run_name.startswith("eval-eval-naming")


def test_rating_only_dataset(dataset, tiny_model_dir):
    """A MOS table imported as rating samples gets rating metrics only."""
    from iqa_spider.evaluate.job import evaluate

    rep = evaluate(eval_config(tiny_model_dir, dataset, "data.tasks=[rating]", "mlflow.enabled=false"))
    assert set(rep["metrics"]) == {"rating"} and rep["metrics"]["rating"]["n"] == 4


def test_job_entrypoint(dataset, tiny_model_dir, tmp_path, capsys, caplog):
    import subprocess
    import sys

    from iqa_spider.evaluate.job import main

    # a bad config fails before anything loads, naming the key
    bad = subprocess.run([sys.executable, str(REPO / "jobs/evaluate.py"), "--config", str(REPO / "configs/evaluate.yaml"),
                          f"model.path={tiny_model_dir}", f"data.uri={dataset}", "infer.mapping=nearest"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "platform")})
    assert bad.returncode == 2 and "infer.mapping" in bad.stderr
    caplog.set_level("INFO", logger="iqa_spider.evaluate.job")
    code = main(["--config", str(REPO / "configs/evaluate.yaml"), f"model.path={tiny_model_dir}",
                 f"data.uri={dataset}", "model.device=cpu", "data.max_images=1", "infer.max_new_tokens=4",
                 "infer.describe_max_new_tokens=4", "mlflow.enabled=false", f"output.uri={tmp_path / 'r'}"])
    assert code == 0
    out = capsys.readouterr().out
    assert "evaluate: 1/1 images" in caplog.text  # progress, chunk by chunk
    written = json.loads((tmp_path / "r" / "report.json").read_text())
    assert written["images"] == 1 and written["data_uri"] == dataset and written["split"] == "test"
    assert written["mapping"] == "paper" and written["model_uri"]
    # the samples of the one (first, by image_id) test image
    from iqa_spider.data.io import read_dataset

    test_rows = [r for r in read_dataset(dataset).to_pylist() if r["split"] == "test"]
    first = min(r["image_id"] for r in test_rows)
    assert written["samples"] == sum(r["image_id"] == first for r in test_rows) > 0
    # the printed metrics are the report's, value for value
    from iqa_spider.evaluate.metrics import flatten_metrics

    printed = dict(line.rsplit(None, 1) for line in out.splitlines() if line.startswith("grounding."))
    flat = flatten_metrics(written["metrics"])
    assert "grounding.all.point_acc" in printed
    for key, value in printed.items():
        assert float(value) == pytest.approx(flat[key], abs=5e-5), key


def test_report_page_escapes_what_comes_from_the_data():
    """The page is a template with autoescape: a model URI, a caption or a chance basis with
    markup in it is shown as text, never run."""
    from iqa_spider.evaluate.report import render_html

    report = {"model_uri": "<script>alert(1)</script>", "model_version": None, "data_uri": "s3://b/d", "split": "test",
              "mapping": "paper", "segmenter": "superpixel", "images": 1, "samples": 1, "control": {},
              "metrics": {"rating": {"srcc": 0.5, "n": 1}}, "chance": {"rating": {"srcc": 0.0}},
              "chance_basis": {"rating.srcc": "a score <b>independent</b> of the image"}}
    page = render_html(report, [], [("scatter.png", "<img src=x onerror=alert(1)>")])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "<b>independent</b>" not in page
    assert "rating</td><td>srcc</td><td><b>0.5000</b></td><td>0.0000</td><td>1</td>" in page
    assert "<img src='plots/scatter.png'" in page
