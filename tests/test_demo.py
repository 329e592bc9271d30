"""`make demo`'s job end to end, shortened: every stage runs for real and hands its output on.

One end-to-end run, the one with the most parts: submitted to a Ray head, every output in
(moto) S3 and a tracking server, the candidate promoted. What a local run adds is tested on
its own: the sqlite store's artifacts beside it (tests/test_train.py), the gate's refusal
(tests/test_promotion.py), a job starting and reaping its own Ray (tests/test_raycluster.py).
Not run end to end: the demo's branch for a refused candidate (it scores with the export
itself), a few lines in iqa_spider/demo.py. A second demo run cost two minutes of a suite
that must stay under twenty.
"""
import json
import os
import subprocess
import sys

from conftest import BIN, REPO, check_score_report

# The demo at reduced size: the tiny model of the demo's class (the small preset's, Qwen3-VL),
# one view per photo, a few training steps, two evaluation images, no floors (a 4-step model
# is at chance).
SHORT = ["tiny.size=tiny", "tiny.family=qwen3_vl",
         "stages.annotate_overrides=[distort.max_side=224,test_fraction=0.3]",
         "stages.evaluate_overrides=[data.max_images=2,infer.describe=false]",
         # the description path runs, with answers cut short (the tiny model never stops on its own)
         "stages.score_overrides=[output.overlays=true,'tasks=[score,ground,describe]',infer.max_new_tokens=12,"
         "infer.describe_max_new_tokens=12]",
         "stages.promote_overrides=['gate=[{name: rating.srcc, direction: higher, tolerance: 0.05, floor: null}]',"
         "data.max_images=2]"]


def short_train(*extra: str) -> str:
    return f"stages.train_overrides=[optim.max_steps=4,checkpoint.every_steps=5{''.join(',' + e for e in extra)}]"


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
    assert f"registered     models:/{name}/1" in proc.stderr
    assert f"champion       models:/{name}@champion -> version 1" in proc.stderr
    assert f"scores         {work}/scores/data" in proc.stderr

    # the base model is of the demo's class, and every stage after it (ZeRO-3 training, export,
    # evaluation, promotion, scoring) ran on it
    assert json.loads(storage.read_bytes(f"{work}/base_model/config.json"))["model_type"] == "qwen3_vl"
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
