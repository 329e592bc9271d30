"""Ray job submission end to end against a real `ray start --head` cluster on 127.0.0.1:
`iqa-spider submit` -> SUCCEEDED with logs and output; a bad config -> FAILED with the config
error in the logs; `jobs stop`; and the same entrypoint through the plain `ray job submit` CLI."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import time

import pytest

from conftest import BIN, REPO, ray_job_submit
from iqa_spider import storage
from iqa_spider.submit import CONFIG_ENV, SubmitError, build_submission, client, submit, wait

SMALL = ["distort.max_side=96", "distort.variants_per_image=1", "tasks.local_per_image=1",
         "tasks.referring_per_image=1"]


@pytest.fixture(scope="module")
def cluster(ray_head):
    return ray_head


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    from iqa_spider.annotate.pipeline import write_builtin_photos

    root = tmp_path_factory.mktemp("submit_photos")
    write_builtin_photos(str(root), limit=2)
    return str(root)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "iqa-spider"), *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def logs(url: str, job_id: str) -> str:
    return cli("jobs", "logs", job_id, "--address", url).stdout


# ------------------------------------------------------------------ no cluster needed

def test_runtime_env_and_entrypoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "abc")
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    entry, renv = build_submission("annotate", str(REPO / "configs/annotate.yaml"), ["input.uri=/a b"],
                                   env=["MY_TOKEN"], working_dir=str(REPO))
    assert entry == "python jobs/annotate.py --config configs/annotate.yaml 'input.uri=/a b'"
    assert renv["working_dir"] == str(REPO) and renv["py_modules"] == [str(REPO / "platform/iqa_spider")]
    assert {".venv", ".git", "demo_out", "mlruns", "mlflow.db", "*.parquet", "__pycache__"} <= set(renv["excludes"])
    assert renv["env_vars"]["AWS_ACCESS_KEY_ID"] == "abc" and renv["env_vars"]["MY_TOKEN"] == "s3cret"
    assert "MLFLOW_TRACKING_TOKEN" not in renv["env_vars"]
    _, bare = build_submission("annotate", None, [], env=[], default_env=False, working_dir=str(REPO))
    assert bare["env_vars"] == {}
    with pytest.raises(SubmitError, match="name, not a value"):
        build_submission("annotate", None, [], env=["MY_TOKEN=x"], working_dir=str(REPO))
    with pytest.raises(SubmitError, match="no job 'nosuchjob'.*annotate"):
        build_submission("nosuchjob", None, [], working_dir=str(REPO))

    outside = tmp_path / "my config.yaml"
    outside.write_text("include:\n  distort: %s\ndistort:\n  max_side: 77\n" % (tmp_path / "inc.yaml"))
    (tmp_path / "inc.yaml").write_text("distort:\n  variants_per_image: 1\n")
    entry, renv = build_submission("annotate", str(outside), ["seed=3"], working_dir=str(REPO))
    assert 'python jobs/annotate.py --config "$d/my_config.yaml" seed=3' in entry
    inline = renv["env_vars"][CONFIG_ENV]
    assert "max_side: 77" in inline and "variants_per_image: 1" in inline  # includes merged here


# ------------------------------------------------------------------ against the cluster

def read_summary(out) -> dict:
    return json.loads(storage.read_bytes(str(out / "_summary.json")))


def check_two_photo_summary(out) -> None:
    """The job's _summary.json (parsed, not matched as text) agrees with the shards it wrote."""
    import pyarrow.parquet as pq

    summary = read_summary(out)
    assert summary["sources"] == 2 and summary["annotated"] == 2 and summary["skipped"] == {}, summary
    rows = sum(pq.read_metadata(p).num_rows for p in out.rglob("*.parquet"))
    assert rows > 0 and summary["samples"] == rows == sum(summary["samples_by_task"].values()), summary


def test_submit_follow_to_succeeded_with_logs_and_output(cluster, photos, tmp_path, monkeypatch):
    # secrets travel by name: one from DEFAULT_ENV, one named with --env
    aws_secret, token = f"aws-{secrets.token_hex(8)}", f"tok-{secrets.token_hex(8)}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("IQA_TEST_TOKEN", token)
    out = tmp_path / "dq"
    r = cli("submit", "annotate", "--config", "configs/annotate.yaml", f"input.uri={photos}",
            f"output.uri={out}", *SMALL, "--env", "IQA_TEST_TOKEN", "--address", cluster)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert job_id.startswith("iqa-annotate-") and "\n" not in job_id
    # names of passed variables are shown, never values
    assert "HF_HUB_OFFLINE" in r.stderr and "AWS_SECRET_ACCESS_KEY" in r.stderr and "IQA_TEST_TOKEN" in r.stderr
    for secret in (aws_secret, token):
        assert secret not in r.stdout + r.stderr
    # ... and the values did reach the job (so their absence above means something)
    env_vars = client(cluster).get_job_info(job_id).runtime_env["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == aws_secret and env_vars["IQA_TEST_TOKEN"] == token

    followed = cli("jobs", "logs", job_id, "--follow", "--address", cluster, timeout=180)
    r = cli("jobs", "status", job_id, "--address", cluster)
    assert followed.returncode == 0 and r.stdout.startswith(f"{job_id}: SUCCEEDED"), followed.stdout + r.stdout
    assert "connected to Ray at" in followed.stdout  # the job joined the cluster it was submitted to
    text = logs(cluster, job_id)
    assert "connected to Ray at" in text
    for secret in (aws_secret, token):
        assert secret not in followed.stdout + followed.stderr + text + r.stdout + r.stderr
    check_two_photo_summary(out)


def test_bad_config_ends_failed_with_the_error_in_logs(cluster, photos, tmp_path):
    job_id = submit("annotate", "configs/annotate.yaml", [f"input.uri={photos}", f"output.uri={tmp_path}",
                    "distort.no_such_key=1"], address=cluster)
    assert wait(job_id, cluster, timeout=90).value == "FAILED"
    text = logs(cluster, job_id)
    assert "config error: command line: key 'distort.no_such_key': unknown key" in text, text
    assert "Traceback" not in text

    # an outside config travels inline; its error names the file
    bad = tmp_path / "outside.yaml"
    bad.write_text("job: annotate\ninput:\n  uri: /x\noutput:\n  uri: /y\ndistort:\n  max_side: big\n")
    r = cli("submit", "annotate", "--config", str(bad), "--address", cluster, "--wait", timeout=120)
    assert r.returncode == 1 and r.stdout.strip().startswith("iqa-annotate-"), r.stderr
    assert "config error:" in r.stderr and "outside.yaml: key 'distort.max_side': wrong type" in r.stderr


SLEEPER = """import os, pathlib, sys, time
state = pathlib.Path(sys.argv[1])
(state / "pid").write_text(str(os.getpid()))
time.sleep(600)
(state / "finished").write_text("not stopped")
"""


def test_jobs_stop_a_running_job(cluster, tmp_path):
    """A job that cannot finish by itself (it sleeps for 10 minutes) is RUNNING when polled, and
    `jobs stop --wait` ends it: STOPPED, its process gone, the rest of its script never run."""
    import psutil

    wd, state = tmp_path / "wd", tmp_path / "state"
    (wd / "jobs").mkdir(parents=True)
    (wd / "jobs" / "sleeper.py").write_text(SLEEPER)
    state.mkdir()
    # through the same submit() as every job: any jobs/NAME.py of the working dir
    job_id = submit("sleeper", None, [str(state)], address=cluster, working_dir=str(wd))
    c, deadline = client(cluster), time.monotonic() + 120
    while not (state / "pid").exists():
        assert not c.get_job_status(job_id).is_terminal(), c.get_job_logs(job_id)
        assert time.monotonic() < deadline, f"{job_id} did not start: {c.get_job_status(job_id).value}"
        time.sleep(0.3)
    pid = int((state / "pid").read_text())
    assert c.get_job_status(job_id).value == "RUNNING" and psutil.pid_exists(pid)
    r = cli("jobs", "stop", job_id, "--wait", "--address", cluster)
    assert r.returncode == 0 and r.stdout.strip() == f"{job_id}: STOPPED", r.stdout + r.stderr
    assert f"stop requested for {job_id}" in r.stderr

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 30
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert gone(), f"the job's process {pid} outlived its stop"
    assert not (state / "finished").exists()
    listed = dict(line.split("\t")[:2] for line in cli("jobs", "list", "--address", cluster).stdout.splitlines())
    assert listed[job_id] == "STOPPED"
    # stopping it again: it is no longer running, and says so
    r = cli("jobs", "stop", job_id, "--address", cluster)
    assert r.returncode == 0 and f"{job_id} was not running" in r.stderr, r.stderr
    # its id cannot be reused: one line, usage exit, no traceback
    r = cli("submit", "sleeper", "--job-id", job_id, "--working-dir", str(wd), "--address", cluster, str(state))
    assert r.returncode == 2 and f"job id {job_id} is already taken" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr
    r = cli("jobs", "status", "no-such-job", "--address", cluster)
    assert r.returncode == 1 and r.stderr.startswith("jobs status:") and "Traceback" not in r.stderr


def test_package_is_shipped_with_py_modules(cluster):
    """The job imports iqa_spider from the uploaded copy, not from an install on the cluster."""
    _, renv = build_submission("annotate", None, [], working_dir=str(REPO))
    c = client(cluster)
    job_id = c.submit_job(entrypoint="python -c 'import iqa_spider; print(\"FROM\", iqa_spider.__file__)'",
                               runtime_env=renv)
    assert wait(job_id, cluster, timeout=60).value == "SUCCEEDED"
    line = next(ln for ln in c.get_job_logs(job_id).splitlines() if ln.startswith("FROM "))
    assert str(REPO) not in line and "py_modules" in line, line


def test_plain_ray_job_submit_runs_the_same_entrypoint(cluster, photos, tmp_path):
    out = tmp_path / "dq"
    job_id = f"plain-{os.getpid()}"
    renv = {"py_modules": ["platform/iqa_spider"], "excludes": ["*.parquet", "mlflow.db", "mlruns"]}  # docs/jobs.md
    r = ray_job_submit(cluster, renv, job_id, ["python", "jobs/annotate.py", "--config", "configs/annotate.yaml",
                                               f"input.uri={photos}", f"output.uri={out}", *SMALL])
    assert r.returncode == 0, r.stdout + r.stderr
    assert wait(job_id, cluster, timeout=150).value == "SUCCEEDED", logs(cluster, job_id)
    check_two_photo_summary(out)
