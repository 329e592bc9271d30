"""Stage-1 training for real: 2 Ray Train CPU workers, DeepSpeed ZeRO-3 over gloo, LoRA,
Ray Data streaming, MLflow on the real server fixture. About 3 minutes in all on 2 cores.
`method: full` and the content/template loss split: tests/test_train_full.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from iqa_spider.config import load_config
from iqa_spider.config.schemas import TrainConfig
from iqa_spider.train.export import HF_DIR, REFERENCE_FILE, REPORT_FILE
from iqa_spider.train.job import run_train

RECIPE = REPO / "configs/train/tiny_cpu.yaml"
STEPS = 24
# Resize bounds of the recipe, other than the tiny checkpoint's own (112^2, 224^2): the export
# must ship them.
TRAIN_PIXELS = (56 * 56, 112 * 112)


def train_config(data, model, out, *overrides) -> TrainConfig:
    return load_config(TrainConfig, RECIPE, [f"data.uri={data}", f"model.path={model}", f"output.uri={out}",
                                             *overrides])


SECRET = "pa55-w0rd"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, annotated_dataset, tiny_model_dir, mlflow_server):
    out = tmp_path_factory.mktemp("train")
    # Credentials in the tracking URI (the server ignores them): none may reach MLflow.
    secret_uri = mlflow_server.uri.replace("http://", f"http://iqa:{SECRET}@")
    cfg = train_config(annotated_dataset, tiny_model_dir, out / "runs", f"optim.max_steps={STEPS}",
                       "checkpoint.every_steps=12", f"tracking.uri={secret_uri}",
                       f"model.min_pixels={TRAIN_PIXELS[0]}", f"model.max_pixels={TRAIN_PIXELS[1]}")
    summary = run_train(cfg)
    from mlflow.tracking import MlflowClient

    return cfg, summary, MlflowClient(mlflow_server.uri)


def test_loss_falls(trained):
    _, summary, client = trained
    losses = [m.value for m in sorted(client.get_metric_history(summary["run_id"], "loss"), key=lambda m: m.step)]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2, f"loss did not fall: first steps {losses[:4]}, last {losses[-4:]}"


def test_each_worker_holds_only_its_shard(trained):
    _, summary, _ = trained
    m = summary["metrics"]
    held = [m["params_held_rank0"], m["params_held_rank1"]]
    # ZeRO-3 pads each partition to the world size, so the halves add up to at least the total.
    assert sum(held) >= m["params_total"]
    for h in held:
        assert h <= 0.5 * m["params_total"] + 1000, f"a worker holds {h} of {m['params_total']} elements"


def test_per_task_losses_rates_and_params_are_tracked(trained):
    cfg, summary, client = trained
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.max_steps"] == str(STEPS)
    assert run.data.params["deepspeed.zero_stage"] == "3"
    for key in ("lr", "samples_per_s", "tokens_per_s", "loss_grounding", "loss_rating", "loss_global_desc",
                "loss_content", "loss_template"):
        assert key in run.data.metrics, key
    assert run.data.tags["data_uri"] == cfg.data.uri
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"config", "system_info.json", "export", "data_counts.json"} <= artifacts
    # the tracking URI had a password: params and the config artifact show it redacted
    assert run.data.params["tracking.uri"].startswith("http://***@127.0.0.1:"), run.data.params["tracking.uri"]
    assert not any(SECRET in str(v) for v in (*run.data.params.values(), *run.data.tags.values()))
    import mlflow

    config_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config/train.yaml")
    assert "tracking" in config_text and SECRET not in config_text and "***@127.0.0.1" in config_text


def test_credentials_are_redacted_from_uris():
    from iqa_spider.tracking import redact

    assert redact("http://user:pw@host:5000/x") == "http://***@host:5000/x"
    assert redact("https://token@mlflow.example.com") == "https://***@mlflow.example.com"
    assert redact("s3://bucket/key?X-Amz-Signature=abc&x=1&token=t0k") == \
        "s3://bucket/key?X-Amz-Signature=***&x=1&token=***"
    assert redact("uri: postgresql://me:pw@db/mlflow\nother: 1") == "uri: postgresql://***@db/mlflow\nother: 1"
    for clean in ("http://127.0.0.1:5000", "s3://bucket/a@b.png", "models:/iqa-spider@champion", "/data/x@2x.png"):
        assert redact(clean) == clean


def test_a_sqlite_store_keeps_its_artifacts_beside_it_not_in_the_working_directory(tmp_path, monkeypatch):
    """The demo's local tracking (sqlite under its workdir): MLflow's default artifact root is
    ./mlruns of the process's working directory; every experiment the jobs create puts its
    artifacts beside the database instead."""
    from mlflow.tracking import MlflowClient

    from iqa_spider.tracking import experiment_id

    started_in = tmp_path / "repo"
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    db = tmp_path / "work" / "mlflow.db"
    db.parent.mkdir()
    client = MlflowClient(f"sqlite:///{db}")
    run = client.create_run(experiment_id(client, "iqa-spider-train"))
    client.log_text(run.info.run_id, "x", "config/train.yaml")
    assert (db.parent / "mlartifacts" / "iqa-spider-train").is_dir()
    assert list((db.parent / "mlartifacts").rglob("train.yaml"))
    assert not list(started_in.iterdir())  # no ./mlruns where the job was started


def test_registered_version_with_provenance_tags(trained):
    cfg, summary, client = trained
    version = client.get_model_version(cfg.tracking.registered_model, summary["model_version"])
    assert version.run_id == summary["run_id"]
    assert version.tags["data_uri"] == cfg.data.uri
    assert len(version.tags["config_hash"]) == 12
    assert version.tags["git_commit"]
    # The registered artifact is the pyfunc wrapping the plain HF directory.
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(f"models:/{cfg.tracking.registered_model}/{summary['model_version']}")
    hf_dir = Path(loaded.unwrap_python_model().model_dir)
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    # ... and it answers through MLflow's own predict, params included.
    import pandas as pd

    from iqa_spider.images import encode_png

    rng = __import__("numpy").random.default_rng(0)
    png = encode_png(rng.integers(0, 255, (80, 96, 3), dtype="uint8"))
    rows = loaded.predict(pd.DataFrame({"image": [png, b"not an image"]}), params={"ground": True})
    assert len(rows) == 2
    good, bad = rows.iloc[0], rows.iloc[1]
    assert good["error"] is None and 1.0 <= good["score"] <= 5.0 and len(good["regions"]) >= 1
    assert bad["error"]


def test_export_reloads_without_peft_and_matches_training_logits(trained, tmp_path):
    _, summary, _ = trained
    ckpt = Path(summary["checkpoint"])
    report = json.loads((ckpt / REPORT_FILE).read_text())
    assert report["method"] == "lora"
    assert report["lora_tensors"] > 0 and report["vision_tensors"] > 0  # no empty-adapter trap
    assert report["max_abs_logit_diff"] <= report["tolerance"] == 1e-4
    # A fresh interpreter where `import peft` fails: the merged export must not need it.
    script = f"""
import sys, torch
sys.modules["peft"] = None
from transformers import AutoModelForImageTextToText
ref = torch.load({str(ckpt / REFERENCE_FILE)!r}, weights_only=False)
model = AutoModelForImageTextToText.from_pretrained({str(ckpt / HF_DIR)!r}).eval()
with torch.no_grad():
    logits = model(**ref["inputs"]).logits.float()
print((logits - ref["logits"]).abs().max().item())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-4
    # The shipped processor resizes as training did, so inference with the checkpoint's own
    # bounds sees training-sized images.
    from transformers import AutoProcessor

    size = AutoProcessor.from_pretrained(ckpt / HF_DIR).image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == TRAIN_PIXELS
    adapter = ckpt / "adapter"
    from safetensors.torch import load_file

    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert lora and all(t.numel() > 0 for t in lora.values())
    assert any(float(t.abs().sum()) > 0 for k, t in lora.items() if "lora_B" in k)  # B starts at 0: it trained


def run_job(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="")  # a bad config must fail before Ray is even reached
    return subprocess.run([sys.executable, str(REPO / "jobs/train.py"), "--config", str(RECIPE), *args],
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("case", ["global_batch", "missing_data", "wrong_schema", "no_model"])
def test_bad_config_fails_before_any_worker(case, tmp_path, tiny_model_dir, annotated_dataset):
    import pyarrow as pa
    import pyarrow.parquet as pq

    args = [f"model.path={tiny_model_dir}", f"data.uri={annotated_dataset}", f"output.uri={tmp_path / 'runs'}"]
    if case == "global_batch":
        args.append("optim.global_batch_size=5")
        expect = "optim.global_batch_size"
    elif case == "missing_data":
        args = [a for a in args if not a.startswith("data.uri")]
        expect = "data.uri"
    elif case == "wrong_schema":
        pq.write_table(pa.table({"image": [b"x"], "label": [3]}), tmp_path / "part-0.parquet")
        args[1] = f"data.uri={tmp_path}"
        expect = "column 'sample_id' missing"
    else:
        args[0] = f"model.path={tmp_path / 'nowhere'}"
        expect = "model.path"
    out = run_job(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("config error")]
    assert len(lines) == 1 and expect in lines[0], out.stderr[-2000:]
    assert "Started a local Ray" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_per_task_loss_is_token_mean_cross_entropy_over_answers_only():
    import torch
    import torch.nn.functional as F

    from iqa_spider.config.schemas import TASK_NAMES
    from iqa_spider.train.loop import LOSS_ROWS, per_task_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 3:6] = torch.tensor([1, 2, 3])
    labels[2, 1:3] = torch.tensor([4, 5])  # sample 1 has no answer token inside the window
    rating, grounding = TASK_NAMES.index("rating"), TASK_NAMES.index("grounding")
    answer_pos = (labels[:, 1:] != -100).nonzero()  # as collate finds them
    loss, stats = per_task_loss(logits, labels, torch.tensor([rating, grounding, rating]), answer_pos)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert stats.shape == (len(LOSS_ROWS), 2) and stats.dtype == torch.float64
    assert LOSS_ROWS[:len(TASK_NAMES)] == TASK_NAMES  # task rows first, then content / template
    assert stats[grounding].tolist() == [0.0, 0.0] and stats[rating, 1] == 5
    assert float(stats[rating, 0]) / 5 == pytest.approx(float(expected), rel=1e-6)
    assert float(stats[:len(TASK_NAMES)].sum(0)[0]) == float(stats[rating, 0])  # no other task got anything
    # the loss sum of sample 0 alone: its three answer tokens
    first = per_task_loss(logits[:1], labels[:1], torch.tensor([grounding]), answer_pos[:3])[1][grounding]
    assert float(first[0]) == pytest.approx(float(F.cross_entropy(logits[0, 2:5], labels[0, 3:6], reduction="sum")))
    assert float(first[1]) == 3


def test_resume_finds_the_newest_complete_checkpoint_in_storage(tmp_path):
    """A worker that dies right after reporting can take the report with it; the run folder
    still has the files, and resuming must use the newest checkpoint that is complete."""
    from iqa_spider.train.loop import STATE_FILE, ZERO_TAG, newest_checkpoint

    def checkpoint(name, step, ranks):
        d = tmp_path / "run" / name
        (d / ZERO_TAG).mkdir(parents=True)
        (d / STATE_FILE).write_text(json.dumps({"kind": "zero", "step": step}))
        for r in ranks:
            (d / ZERO_TAG / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x")
        return d

    assert newest_checkpoint(None, str(tmp_path / "run"), world=2) is None  # a fresh run
    checkpoint("checkpoint_a", 3, ranks=[0, 1])
    checkpoint("checkpoint_b", 6, ranks=[0])            # rank 1's shard never arrived
    found = newest_checkpoint(None, str(tmp_path / "run"), world=2)
    assert found.path.endswith("checkpoint_a")
    checkpoint("checkpoint_c", 9, ranks=[0, 1])
    assert newest_checkpoint(None, str(tmp_path / "run"), world=2).path.endswith("checkpoint_c")


def test_training_reads_only_its_split_and_columns(annotated_dataset, tiny_model_dir, ray_local, tmp_path):
    from iqa_spider.train.data import TRAIN_COLUMNS, check_dataset, read_split

    for split in ("train", "test"):
        cfg = train_config(annotated_dataset, tiny_model_dir, tmp_path, f"data.split={split}")
        rows = read_split(cfg).take_all()
        per_task = {}
        for row in rows:
            per_task[row["task"]] = per_task.get(row["task"], 0) + 1
        assert rows and {row["split"] for row in rows} == {split}
        assert set(rows[0]) == set(TRAIN_COLUMNS)
        assert per_task == check_dataset(cfg)  # the Ray read agrees with the driver's footer count

