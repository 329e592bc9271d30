"""`make demo`'s job end to end, shortened: every stage runs for real and hands its output on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, REPO, check_score_report


# The demo at reduced size: the tiny model, one view per photo, a few training steps, two
# evaluation images, no floors (a 4-step model is at chance).
SHORT = ["tiny.size=tiny", "stages.annotate_overrides=[distort.max_side=224,test_fraction=0.3]",
         "stages.evaluate_overrides=[data.max_images=2,infer.describe=false]",
         # the description path runs, with answers cut short (the tiny model never stops on its own)
         "stages.score_overrides=[output.overlays=true,'tasks=[score,ground,describe]',infer.max_new_tokens=12,"
         "infer.describe_max_new_tokens=12]",
         "stages.promote_overrides=['gate=[{name: rating.srcc, direction: higher, tolerance: 0.05, floor: null}]',"
         "data.max_images=2]"]


def short_train(*extra: str) -> str:
    return f"stages.train_overrides=[optim.max_steps=4,checkpoint.every_steps=5{''.join(',' + e for e in extra)}]"


# A gate no model can pass (an accuracy above its chance figure + 1.5): the demo's refused path.
REFUSING_GATE = ("stages.promote_overrides=['gate=[{name: referring_short.type_acc, direction: higher, "
                 "tolerance: 0.05, above_chance: 1.5}]',data.max_images=2]")


def test_demo_runs_every_stage(tmp_path):
    """Every stage locally; the gate refuses the candidate (a floor above chance it cannot meet),
    so the demo says so and scores with the trained model (promotion itself: the S3 test)."""
    overrides = [f"workdir={tmp_path / 'demo'}", short_train(), *SHORT, REFUSING_GATE]
    proc = subprocess.run([sys.executable, str(REPO / "jobs/demo.py"), "--config", str(REPO / "configs/demo.yaml"),
                           *overrides], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "demo"
    summary = json.loads((work / "dataset" / "_summary.json").read_text())
    assert summary["annotated"] == summary["sources"] > 0
    assert "registered     models:/iqa-spider/1" in proc.stdout
    report = json.loads((work / "evaluate" / "report.json").read_text())
    assert report["images"] == 2 and report["samples"] > 0
    assert (work / "evaluate" / "report.html").stat().st_size > 1000
    assert Path(work / "mlflow.db").is_file()
    # the artifacts beside the database, none in the directory the demo was started from
    assert not (tmp_path / "mlruns").exists() and any((work / "mlartifacts").rglob("MLmodel"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert f"{'gate':<14} refused: referring_short.type_acc: candidate" in proc.stdout
    assert "does not beat chance" in proc.stdout
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):  # refused: no version became champion
        client.get_model_version_by_alias("iqa-spider", "champion")

    # batch scoring with the champion: every input once, the broken ones with a reason
    scores = json.loads((work / "scores" / "_summary.json").read_text())
    photos = len(list((work / "photos").glob("*.png")))
    assert scores["rows"] == photos + 3 and scores["scored"] == photos
    assert scores["errors"] == {"empty": 1, "not_an_image": 1, "corrupt": 1}
    assert scores["model_version"] is None  # the trained export itself, not a registry version
    check_contracts(str(work))
    scored = work / "scores"
    check_score_report(lambda rel: (scored / rel).read_bytes(),
                       lambda: [str(p.relative_to(scored)) for p in scored.rglob("*") if p.is_file()])


def check_contracts(work: str) -> None:
    """The dataset and the result Parquet hold to their contracts, row by row."""
    from iqa_spider.data.io import read_dataset, read_table
    from iqa_spider.infer.results import RESULT_SCHEMA, check_row

    assert read_dataset(f"{work}/dataset").num_rows > 0  # raises on any contract violation
    results = read_table(f"{work}/scores/data")
    assert results.schema.names == RESULT_SCHEMA.names
    problems = {r["image_uri"]: check_row(r) for r in results.to_pylist()}
    assert not any(problems.values()), problems


def test_demo_in_s3_on_a_remote_cluster_is_one_config_change(ray_head, moto_s3, mlflow_server, tmp_path):
    """`iqa-spider submit demo ... workdir=s3://...`: the job runs on the cluster it was submitted
    to and every output lands in S3 and the tracking server (both reached from the job through
    the forwarded AWS_* / MLFLOW_TRACKING_URI variables)."""
    from mlflow.tracking import MlflowClient

    from iqa_spider import storage

    work = f"s3://{moto_s3.bucket}/demo-{tmp_path.name}"
    name = f"demo-remote-{tmp_path.name}"[:60]
    proc = subprocess.run([str(BIN / "iqa-spider"), "submit", "demo", "--config", "configs/demo.yaml",
                           f"workdir={work}", short_train(f"tracking.registered_model={name}"), *SHORT,
                           "--address", ray_head, "--wait"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "connected to Ray at" in proc.stderr  # joined the cluster it was submitted to
    assert f"scores         {work}/scores/data" in proc.stderr

    summary = json.loads(storage.read_bytes(f"{work}/dataset/_summary.json"))
    assert summary["annotated"] == summary["sources"] > 0
    assert json.loads(storage.read_bytes(f"{work}/evaluate/report.json"))["images"] == 2
    scores = json.loads(storage.read_bytes(f"{work}/scores/_summary.json"))
    assert scores["errors"] == {"empty": 1, "not_an_image": 1, "corrupt": 1}
    assert scores["scored"] == scores["rows"] - 3 > 0
    champion = MlflowClient(mlflow_server.uri).get_model_version_by_alias(name, "champion")
    assert str(champion.version) == scores["model_version"]
    check_contracts(work)
    base = f"{work}/scores"
    check_score_report(lambda rel: storage.read_bytes(f"{base}/{rel}"),
                       lambda: [storage.relative_key(base, u) for u in storage.iter_files(base)])


def test_demo_in_s3_needs_a_tracking_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs/demo.py"), "--config", str(REPO / "configs/demo.yaml"),
                           "workdir=s3://bucket/demo"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "workdir" in proc.stderr and "MLFLOW_TRACKING_URI" in proc.stderr
