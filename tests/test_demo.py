"""`make demo`'s job end to end, shortened: every stage runs for real and hands its output on."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_demo_runs_every_stage(tmp_path):
    overrides = [f"workdir={tmp_path / 'demo'}", "stages.train_overrides=[optim.max_steps=4,checkpoint.every_steps=5]",
                 "stages.evaluate_overrides=[data.max_images=2,infer.describe=false]",
                 "stages.promote_overrides=['gate=[{name: rating.srcc, direction: higher, tolerance: 0.05, floor: null}]',"
                 "data.max_images=2]"]
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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("iqa-spider", "champion").version) == "1"

    # batch scoring with the champion: every input once, the broken ones with a reason
    scores = json.loads((work / "scores" / "_summary.json").read_text())
    photos = len(list((work / "photos").glob("*.png")))
    assert scores["rows"] == photos + 3 and scores["scored"] == photos
    assert scores["errors"] == {"empty": 1, "not_an_image": 1, "corrupt": 1}
    assert scores["model_version"] == "1"
    page = (work / "scores" / "report.html").read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", page)
    assert any(link.startswith("overlays/") for link in links)
    for link in links:  # every image the page shows is there
        assert (work / "scores" / link).is_file(), link
