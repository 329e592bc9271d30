"""Session fixtures shared by every test: real services on 127.0.0.1, each started as a
real process here and stopped at the end of the session.

- tiny_model_dir / tiny_qwen3_model_dir: the project's own tiny random Qwen-VL models
- ray_local:      a local Ray cluster with 2 CPUs
- moto_s3:        a moto S3 server, with a bucket, wired through AWS_* variables
- mlflow_server:  `mlflow server` with a sqlite backend and a local artifact folder
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# No downloads at run time, and no telemetry from the services we start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"service exited with {proc.returncode} before {url} answered:\n{tail}")
        with contextlib.suppress(Exception):
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def env_vars(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_down():
    """S3 unreachable: an endpoint on a free port nobody listens on, one botocore attempt (so a
    test sees the failure in about a second, not after a minute of retries)."""
    return env_vars(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1",
                    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from iqa_spider.model.tiny import init_tiny

    return init_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", seed=0)


@pytest.fixture(scope="session")
def tiny_sam_dir(tmp_path_factory) -> Path:
    """The project's own tiny random SAM (the `sam` segmenter and region proposals)."""
    from iqa_spider.model.tiny_sam import init_tiny_sam

    return init_tiny_sam(tmp_path_factory.mktemp("tiny_sam") / "sam", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen3_model_dir(tmp_path_factory) -> Path:
    from iqa_spider.model.tiny import init_tiny

    return init_tiny("qwen3_vl", tmp_path_factory.mktemp("tiny") / "qwen3_vl", seed=0)


@pytest.fixture(scope="session")
def annotated_dataset(tmp_path_factory, ray_local) -> Path:
    """A small four-task dataset (train and test splits) annotated from bundled photos."""
    from iqa_spider.annotate.pipeline import run_annotate, write_builtin_photos
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig

    root = tmp_path_factory.mktemp("annotated")
    write_builtin_photos(str(root / "photos"), limit=12)  # the suite's size before the list grew
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={root / 'photos'}", f"output.uri={root / 'dq'}", "distort.max_side=160",
                       "test_fraction=0.25"])
    run_annotate(cfg)
    return root / "dq"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster with 2 CPUs (the size of the CI machine)."""
    import ray

    # With the dashboard, as jobs start it: Ray Train's placement-group cleaner needs its State API.
    ctx = ray.init(num_cpus=2, include_dashboard=True, log_to_driver=True,
                   configure_logging=False, ignore_reinit_error=False)
    try:
        yield ctx
    finally:
        ray.shutdown()


def _sweep(temp_dir: str, gcs_port: int) -> None:
    """Kill, by pid, what is left of a test cluster: processes with its temp dir on the command
    line, and job drivers whose RAY_ADDRESS is its GCS. (`ray stop` would kill every cluster.)"""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if temp_dir in " ".join(p.info["cmdline"] or []) or p.environ().get("RAY_ADDRESS", "").endswith(f":{gcs_port}"):
                p.kill()
        except (psutil.Error, OSError):
            continue


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> str:
    """A `ray start --head --block` cluster on 127.0.0.1 with 2 CPUs, as users run one; yields the
    dashboard URL (the Job Submission address)."""
    from iqa_spider.submit import client

    root = tmp_path_factory.mktemp("raycluster")
    temp = Path("/tmp") / f"rs{os.getpid()}"  # short: Ray's socket paths must fit in 107 bytes
    port, dash = free_port(), free_port()
    # the venv's python first on PATH (job entrypoints call `python`); no 30 s node drain at stop
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    log = root / "ray.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--port", str(port),
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                                 "--include-dashboard", "true", "--temp-dir", str(temp), "--disable-usage-stats",
                                 # not the default agent port: ray_local may hold it in this session
                                 "--dashboard-agent-listen-port", str(free_port())],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        # Ready when the Jobs API answers through the SDK (Ray 2.60 clusters use token auth, so a
        # plain HTTP probe sees 401 and the job agent starts after the dashboard).
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                client(url).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        stop(proc)
        _sweep(str(temp), port)
        shutil.rmtree(temp, ignore_errors=True)


@dataclass
class S3Server:
    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket,) + parts)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and a bucket, reached through the standard AWS_* vars."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", 60, proc, log)
        with env_vars(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"):
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="iqa-test")
            yield S3Server(endpoint=endpoint, bucket="iqa-test")
    finally:
        stop(proc)


@dataclass
class MlflowServer:
    uri: str
    artifacts: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a sqlite backend; MLFLOW_TRACKING_URI points at it."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = root / "server.log"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 120, proc, log)
        with env_vars(MLFLOW_TRACKING_URI=uri):
            yield MlflowServer(uri=uri, artifacts=root / "artifacts")
    finally:
        stop(proc)


def register_model(client, name: str, model_dir: Path, experiment: str, tags: dict | None = None,
                   metrics: dict | None = None) -> str:
    """What training does: a run in ``experiment``, the HF directory logged as its pyfunc model,
    a new registered version of ``name``; returns the version."""
    from iqa_spider.registry.pyfunc import log_and_register
    from iqa_spider.tracking import experiment_id

    run_id = client.create_run(experiment_id(client, experiment), tags=tags or {}).info.run_id
    for key, value in (metrics or {}).items():
        client.log_metric(run_id, key, value)
    version = log_and_register(client, run_id, Path(model_dir), name, tags or {})
    client.set_terminated(run_id, "FINISHED")
    return version


def ray_job_submit(address: str, runtime_env: dict, job_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """The plain `ray job submit --no-wait` CLI from the repository root, as docs/jobs.md shows it.

    Retried while the cluster says "No available agent": on a loaded machine the Jobs API
    answers a little before the node's job agent does.
    """
    import json

    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps(runtime_env), "--submission-id", job_id, "--no-wait", "--", *entrypoint]
    deadline = time.monotonic() + 90
    while True:
        # the `ray job` CLI sends the cluster's auth token only with RAY_AUTH_MODE=token
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=90,
                           env={**os.environ, "RAY_AUTH_MODE": "token"})
        if r.returncode == 0 or "No available agent" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


@contextlib.contextmanager
def serve_app(args: dict):
    """The IQA-Spider Serve application built from ``args`` (as `serve run serving.app:build_app`
    gets them) on a free port of 127.0.0.1 of the running Ray; yields its URL once healthy."""
    from ray import serve

    from iqa_spider.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="iqa-spider", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", 120)
        yield url
    finally:
        serve.shutdown()


def check_score_report(read, list_keys) -> None:
    """The score report's images are all there; ``read(rel)`` reads below the scores folder."""
    page = read("report.html").decode()
    links = re.findall(r"(?:src|href)='([^']+)'", page)
    assert any(link.startswith("overlays/") for link in links)
    present = set(list_keys())
    for link in links:
        assert link in present, link
