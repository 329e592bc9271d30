"""Batch scoring against a moto S3 server: 30+ inputs with every bad kind, nested prefixes,
spaces and unicode in keys; exactly one row per key even when a scoring actor dies mid-block;
resume; the Serve backend gives the actor pool's rows; and `ray job submit` on a real
`ray start --head` cluster."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, check_score_report, env_vars, ray_job_submit, s3_down, serve_app
from iqa_spider import storage
from iqa_spider.config import load_config
from iqa_spider.infer import results as R
from iqa_spider.score.config import CRASH_ENV, ScoreConfig
from iqa_spider.submit import EXCLUDES

MAX_PIXELS = 40_000  # 200 x 200: the "huge" inputs are over it, every good one (<= 160 px) under it


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def make_inputs() -> tuple[dict[str, bytes], dict[str, str | None], dict[str, tuple[int, int]]]:
    """(key -> bytes, key -> expected error reason or None, key -> expected (width, height))
    for inputs; the ignored (non-image) files have no expectation."""
    from iqa_spider.annotate.pipeline import iter_builtin_photos

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(a) for _, a in iter_builtin_photos()]
    files: dict[str, bytes] = {}
    expect: dict[str, str | None] = {}
    sizes: dict[str, tuple[int, int]] = {}

    def photo(k: int) -> Image.Image:
        w, h = int(rng.integers(96, 161)), int(rng.integers(96, 161))
        return photos[k % len(photos)].convert("RGB").resize((w, h))

    folders = ["", "a/", "a/b/", "a/b/c deep/", "with space/", "ünïcødé/", "日本/"]
    for i in range(18):  # good photos, PNG and JPEG, spread over nested prefixes
        img = photo(i)
        ext = ".png" if i % 2 else ".JPG"
        key = f"{folders[i % len(folders)]}photo {i:02d}{ext}" if i % 3 == 0 else f"{folders[i % len(folders)]}photo_{i:02d}{ext}"
        files[key] = _png(img) if ext == ".png" else _jpeg(img)
        expect[key], sizes[key] = None, img.size
    base = photo(3)
    odd = {
        "modes/cmyk.jpg": _jpeg(base.convert("CMYK")),
        "modes/grey.png": _png(base.convert("L")),
        "modes/palette.png": _png(base.convert("P")),
        "modes/rgba.png": _png(base.convert("RGBA")),
        "modes/la.png": _png(base.convert("LA")),
        "modes/sixteen_bit.png": _png(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)),
        "modes/one_by_one.png": _png(Image.new("RGB", (1, 1), (200, 30, 30))),
        "modes/no extension image": _png(base),  # found by its magic bytes
    }
    for key, data in odd.items():
        files[key], expect[key] = data, None
        sizes[key] = (1, 1) if "one_by_one" in key else base.size
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the upright image is h x w
    files["modes/exif_rotated.jpg"] = _jpeg(base, exif=exif.tobytes())
    expect["modes/exif_rotated.jpg"], sizes["modes/exif_rotated.jpg"] = None, (base.height, base.width)
    good_png = _png(photo(5))
    bad = {
        "bad/zero.png": (b"", "empty"),
        "bad/truncated.jpg": (_jpeg(photo(6))[:900], "corrupt"),
        "bad/corrupt.png": (good_png[:40] + rng.integers(0, 255, 3000, dtype=np.uint8).tobytes(), "corrupt"),
        "bad/not an image.jpg": (b"this is a text file with an image name\n" * 10, "not_an_image"),
        "bad/huge.png": (_png(Image.new("RGB", (300, 300), (9, 9, 9))), "too_many_pixels"),
        "bad/bomb.png": (_png(Image.new("1", (12000, 12000))), "too_many_pixels"),  # a decompression bomb
        "bad/thin.png": (_png(Image.new("RGB", (160, 1))), "bad_aspect_ratio"),
    }
    for key, (data, why) in bad.items():
        files[key], expect[key] = data, why
    # not inputs: counted as ignored, never rows
    files["notes.txt"] = b"not an image"
    files["a/labels.json"] = b"{}"
    files["a/README"] = b"plain text without a suffix"
    return files, expect, sizes


@pytest.fixture(scope="module")
def s3_inputs(moto_s3):
    import boto3

    files, expect, sizes = make_inputs()
    s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint)
    for key, data in files.items():
        s3.put_object(Bucket=moto_s3.bucket, Key=f"score-in/{key}", Body=data)
    uri = moto_s3.uri("score-in")
    return uri, {f"{uri}/{k}": v for k, v in expect.items()}, {f"{uri}/{k}": v for k, v in sizes.items()}


def score_cfg(tiny_model_dir, input_uri: str, output_uri: str, *extra: str) -> ScoreConfig:
    return load_config(ScoreConfig, REPO / "configs/score.yaml", [
        f"model.path={tiny_model_dir}", f"input.uri={input_uri}", f"output.uri={output_uri}",
        f"infer.max_pixels={MAX_PIXELS}", "infer.max_new_tokens=12", "output.block_size=8",
        "scoring.num_cpus=0.5", "input.retry_backoff_s=0.05", *extra])


def _fresh(uri: str) -> str:
    """Drop this process's s3fs listing cache: the shards were written by Ray workers."""
    fs, path = storage.get_fs(uri)
    fs.invalidate_cache(path)
    return uri


def read_rows(output_uri: str) -> list[dict]:
    rows = []
    _fresh(storage.join(output_uri, "data"))
    for uri in storage.iter_files(storage.join(output_uri, "data"), suffixes=(".parquet",)):
        fs, path = storage.get_fs(uri)
        with fs.open(path, "rb") as f:
            t = pq.read_table(f)
        assert t.schema.remove_metadata().equals(R.RESULT_SCHEMA), t.schema
        rows += t.to_pylist()
    return rows


def shard_names(output_uri: str) -> set[str]:
    _fresh(storage.join(output_uri, "data"))
    return {u.rsplit("/", 1)[1] for u in storage.iter_files(storage.join(output_uri, "data"))}


# ------------------------------------------------------------------ no Ray needed

def test_read_retry_backs_off_on_transient_errors():
    from iqa_spider.storage import read_with_retry  # the one score's read tasks use (stages)

    calls = []

    def flaky(uri):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"

    assert read_with_retry("s3://b/k", attempts=4, backoff_s=0.01, reader=flaky) == b"ok" and len(calls) == 3
    # exponential backoff with jitter in [0.5, 1.5): at least 0.005 s, then at least 0.01 s
    assert calls[1] - calls[0] >= 0.005 and calls[2] - calls[1] >= 0.01, calls

    def always(exc):
        def reader(uri):
            calls.append(uri)
            raise exc
        return reader

    calls.clear()
    with pytest.raises(TimeoutError):  # still failing after every attempt: the caller's error row says why
        read_with_retry("s3://b/k", attempts=2, backoff_s=0.01, reader=always(TimeoutError("read timed out")))
    assert len(calls) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):  # missing: not retried
        read_with_retry("s3://b/k", attempts=4, backoff_s=10, reader=always(FileNotFoundError("s3://b/k")))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(PermissionError):  # denied: not retried either
        read_with_retry("s3://b/k", attempts=4, backoff_s=10, reader=always(PermissionError("AccessDenied")))
    assert len(calls) == 1
    # botocore's own errors are not OSError, and s3fs passes some through: they are retried too
    from botocore.exceptions import EndpointConnectionError, ResponseStreamingError

    for exc in (EndpointConnectionError(endpoint_url="http://s3"), ResponseStreamingError(error="cut")):
        calls.clear()
        with pytest.raises(type(exc)):
            read_with_retry("s3://b/k", attempts=3, backoff_s=0.01, reader=always(exc))
        assert len(calls) == 3


def test_storage_down_is_an_error_row_not_a_failed_job(tmp_path):
    """read_decode with S3 unreachable (botocore's EndpointConnectionError, not an OSError) and
    a missing local file: both become `unreadable` rows; the block goes on."""
    import pickle

    from iqa_spider.score.stages import read_decode

    good = tmp_path / "ok.png"
    good.write_bytes(_png(Image.new("RGB", (40, 30), (90, 120, 30))))
    keys = ["s3://photos/a.png", str(tmp_path / "missing.png"), str(good)]
    with s3_down():
        out = read_decode({"payload": pickle.dumps({"keys": keys})}, max_pixels=10**7, attempts=1, backoff_s=0.0)
    items = pickle.loads(out["payload"])["items"]
    assert [it["key"] for it in items] == keys
    assert items[0]["error"].startswith("unreadable: EndpointConnectionError")
    assert items[1]["error"].startswith("unreadable: FileNotFoundError")
    assert items[2]["error"] is None and items[2]["image"].shape[2] == 3


def test_serve_backend_sends_a_lost_call_again_then_fails_the_block(monkeypatch):
    """Backend serve: a call lost in transit is sent again; one that never answers fails the
    block (and the job, which a re-run resumes) instead of writing an error row for a fine image."""
    from iqa_spider.score import stages

    monkeypatch.setattr(stages, "SERVE_RETRY_WAIT_S", 0.0)
    scorer = object.__new__(stages.ServeScorer)  # the retry alone: no Serve application needed
    scorer.timeout_s = 1.0

    class Response:
        def __init__(self, outcome):
            self.outcome = outcome

        def result(self, timeout_s):
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

    sent = []

    def resend(outcome):
        def again():
            sent.append(1)
            return Response(outcome)
        return again

    lost = Response(TimeoutError("no answer in 1 s"))
    assert scorer._result(lost, resend({"score": 3.0}), "a.png") == {"score": 3.0} and len(sent) == 1
    sent.clear()
    with pytest.raises(RuntimeError, match="Serve call for b.png failed 3 times; last: ConnectionError"):
        scorer._result(lost, resend(ConnectionError("replica gone")), "b.png")
    assert len(sent) == stages.SERVE_ATTEMPTS - 1


def test_config_errors_exit_2(tmp_path, capsys):
    from iqa_spider.score.job import main

    assert main(["--config", str(REPO / "configs/score.yaml"), "input.uri=/x", f"output.uri={tmp_path}",
                 "tasks=[ground]"]) == 2
    assert "key 'tasks'" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs/score.yaml"), "input.uri=/x", f"output.uri={tmp_path}",
                 "scoring.actorz=2"]) == 2


def test_alias_is_pinned_once_on_the_driver(monkeypatch, tmp_path):
    """models:/name@alias -> one version for every actor (no registry needed: the resolver is
    the inference engine's, tested against a real MLflow server in test_infer_loading)."""
    from iqa_spider.config import ConfigError
    from iqa_spider.model import loading
    from iqa_spider.score.job import resolve_model

    seen = []

    def fake(uri, tracking_uri=None):
        seen.append(uri)
        assert tracking_uri == "http://registry:5000"  # the config's server, not only the environment's
        if "missing" in uri:
            raise LookupError("no alias 'missing'")
        return "7", "run123", "models:/iqa-spider/7"

    monkeypatch.setattr(loading, "resolve_mlflow_version", fake)
    cfg = load_config(ScoreConfig, REPO / "configs/score.yaml", ["input.uri=/x", f"output.uri={tmp_path}",
                                                                  "model.tracking_uri=http://registry:5000"])
    assert cfg.model.path == "models:/iqa-spider@champion"  # the default
    assert resolve_model(cfg) == ("models:/iqa-spider@champion", "7") and cfg.model.path == "models:/iqa-spider/7"
    cfg.model.path = "models:/iqa-spider@missing"
    with pytest.raises(ConfigError, match="model.path"):
        resolve_model(cfg)
    cfg.model.path = str(tmp_path)
    assert resolve_model(cfg) == (str(tmp_path), None) and len(seen) == 2


# ------------------------------------------------------------------ the job on moto S3

@pytest.fixture(scope="module")
def first_run(ray_local, moto_s3, s3_inputs, tiny_model_dir, tmp_path_factory):
    """The job over every input, with a scoring actor that dies mid-block once and a read
    task's worker that dies once; the job's own warnings are kept."""
    import logging

    from iqa_spider.score.job import run_score

    input_uri, expect, _ = s3_inputs
    out = moto_s3.uri("score-out", "run1")
    marker = tmp_path_factory.mktemp("crash") / "crashed"
    cfg = score_cfg(tiny_model_dir, input_uri, out, "output.masks=true", "output.overlays=true")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    job_log = logging.getLogger("iqa_spider.score.job")
    job_log.addHandler(handler)
    try:
        with env_vars(**{CRASH_ENV: str(marker)}):
            summary = run_score(cfg)
    finally:
        job_log.removeHandler(handler)
    summary["job_warnings"] = warnings
    return out, summary, marker


def test_one_row_per_key_with_reasons_despite_an_actor_crash(first_run, s3_inputs):
    out, summary, marker = first_run
    _, expect, sizes = s3_inputs
    assert len(expect) >= 30
    assert marker.exists() and marker.with_name("crashed.read").exists(), "a crash hook never fired"
    assert summary["this_run"]["actor_restarts"] == 1   # the job's own summary counts the restart
    assert summary["this_run"]["task_retries"] == {"read": 1, "write": 0}  # and the read task retried
    said = summary["job_warnings"]                      # and its own log says both, as they happen
    assert any("scoring actor was restarted" in w for w in said), said
    assert any("was retried in read (1x)" in w for w in said), said
    rows = read_rows(out)
    keys = [r["image_uri"] for r in rows]
    assert sorted(keys) == sorted(expect), set(keys) ^ set(expect)  # exactly once: no loss, no duplicate
    by_key = {r["image_uri"]: r for r in rows}
    for key, why in expect.items():
        row = by_key[key]
        assert R.check_row(row) == [], (key, row)
        if why is None:
            assert row["error"] is None and 1 <= row["score"] <= 5, (key, row["error"])
            assert (row["width"], row["height"]) == sizes[key], key
            assert len(row["regions"]) >= 1 and row["regions"][0]["query"].startswith("Which is the most degraded")
        else:
            assert row["error"] is not None and row["error"].split(":")[0] == why, (key, row["error"])
            assert row["score"] is None
            assert " at 0x" not in row["error"], row["error"]   # deterministic: no object reprs
        if why == "too_many_pixels":  # refused from the header, which still gave the size
            assert (row["width"], row["height"]) == {"huge.png": (300, 300), "bomb.png": (12000, 12000)}[
                key.rsplit("/", 1)[-1]], (key, row)
        assert row["image_sha256"] and row["model_uri"] and row["scored_at"] is not None
    assert summary["rows"] == len(expect) and summary["ignored_files"] == 3
    assert summary["errors"] == {"empty": 1, "corrupt": 2, "not_an_image": 1, "too_many_pixels": 2,
                                 "bad_aspect_ratio": 1}
    assert summary["this_run"]["slowest_stage"] in ("read", "decode", "score", "write")
    assert sum(summary["score_histogram"]["counts"]) == summary["scored"]
    assert storage.exists(f"{out}/_histogram.png") and storage.exists(f"{out}/_summary.json")
    overlays = list(storage.iter_files(_fresh(f"{out}/overlays")))
    assert len(overlays) == summary["scored"]
    assert any("ünïcødé/" in u for u in overlays) and any("with space/" in u for u in overlays)
    # the hash is of the bytes read; each region's mask file is its RLE, pixel for pixel
    import hashlib

    from iqa_spider.data import rle

    input_uri = s3_inputs[0]
    masks = 0
    for key, row in by_key.items():
        if row["error"] is not None and row["error"].startswith("empty"):
            continue
        assert row["image_sha256"] == hashlib.sha256(storage.read_bytes(key)).hexdigest(), key
        for k, region in enumerate(row["regions"] or []):
            if region["mask_rle"] is None:
                continue
            rel = storage.relative_key(input_uri, key)
            png = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{out}/masks/{rel}.{k}.png"))))
            assert np.array_equal(png > 0, rle.decode(region["mask_rle"])), (key, k)
            masks += 1
    assert masks >= 1 and masks == len(list(storage.iter_files(_fresh(f"{out}/masks"))))  # no stray mask file
    # the HTML report links only files that exist, keys with spaces and unicode included
    listed = [storage.relative_key(out, u) for u in storage.iter_files(_fresh(out))]
    check_score_report(lambda rel: storage.read_bytes(f"{out}/{rel}"), lambda: listed)


def test_rerun_skips_everything_then_resumes_a_lost_shard(first_run, s3_inputs, tiny_model_dir):
    from iqa_spider.score.job import run_score

    out, first, _ = first_run
    input_uri, expect, _ = s3_inputs
    before = shard_names(out)
    again = run_score(score_cfg(tiny_model_dir, input_uri, out))
    assert again["this_run"]["keys"] == 0 and again["this_run"]["skipped_already_done"] == len(expect)
    assert shard_names(out) == before and again["rows"] == len(expect)

    # a crashed or cancelled job: one shard never got written -> only its keys are scored
    lost = sorted(before)[0]
    fs, path = storage.get_fs(f"{out}/data/{lost}")
    lost_keys = pq.read_table(fs.open(path, "rb"), columns=["image_uri"]).column(0).to_pylist()
    fs.rm(path)
    resumed = run_score(score_cfg(tiny_model_dir, input_uri, out))
    assert resumed["this_run"]["keys"] == len(lost_keys)
    assert resumed["this_run"]["skipped_already_done"] == len(expect) - len(lost_keys)
    rows = read_rows(out)
    assert sorted(r["image_uri"] for r in rows) == sorted(expect)
    assert resumed["errors"] == first["errors"]


def test_retry_errors_scores_those_rows_again_once(first_run, s3_inputs, tiny_model_dir, moto_s3):
    """After raising infer.max_pixels, `input.retry_errors=[too_many_pixels]` takes those rows out
    of their shards and scores their keys again: each key still has exactly one row."""
    from iqa_spider.data.io import read_shard_summary
    from iqa_spider.score.job import run_score

    out, first, _ = first_run
    input_uri, expect, _ = s3_inputs
    copy = moto_s3.uri("score-out", "retry")  # a copy: other tests read the first run's output
    storage.copy_tree(out, copy)
    again = run_score(score_cfg(tiny_model_dir, input_uri, copy, "infer.max_pixels=200000",
                                "input.retry_errors=[too_many_pixels]"))
    retried = {k for k, why in expect.items() if why == "too_many_pixels"}
    assert again["this_run"]["keys"] == len(retried) == 2
    rows = {r["image_uri"]: r for r in read_rows(copy)}
    assert len(read_rows(copy)) == len(rows) == len(expect)  # one row per key: none doubled, none lost
    huge, bomb = (f"{input_uri}/bad/huge.png", f"{input_uri}/bad/bomb.png")
    assert rows[huge]["error"] is None and 1.0 <= rows[huge]["score"] <= 5.0  # 300 x 300 fits now
    assert rows[bomb]["error"].startswith("too_many_pixels")                # 12000 x 12000 still does not
    assert again["errors"]["too_many_pixels"] == 1
    assert {k: n for k, n in again["errors"].items() if k != "too_many_pixels"} == \
        {k: n for k, n in first["errors"].items() if k != "too_many_pixels"}
    for uri in storage.iter_files(_fresh(storage.join(copy, "data")), suffixes=(".parquet",)):
        summary = read_shard_summary(uri)  # rewritten shards keep a footer that adds up
        fs, path = storage.get_fs(uri)
        assert summary["keys"] == pq.read_metadata(fs.open(path, "rb")).num_rows
    with pytest.raises(Exception, match="input.retry_errors"):
        score_cfg(tiny_model_dir, input_uri, copy, "input.retry_errors=[too_big]")


def test_serve_backend_gives_the_same_rows(first_run, s3_inputs, ray_local, tiny_model_dir, moto_s3):
    from iqa_spider.score.job import run_score

    out, _, _ = first_run
    input_uri, _, _ = s3_inputs
    args = {
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "infer": {"max_new_tokens": 12, "max_pixels": MAX_PIXELS},
        "deployments": {"model": {"num_cpus": 0.5, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
                        "grounding": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.1}},
        "forward_env": ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"],
    }
    with serve_app(args):
        serve_out = moto_s3.uri("score-out", "serve")
        summary = run_score(score_cfg(tiny_model_dir, f"{input_uri}/modes", serve_out, "backend=serve",
                                      "serve.clients=1"))
    want = sorted(k for k in s3_inputs[1] if k.startswith(f"{input_uri}/modes/"))
    assert summary["backend"] == "serve" and summary["rows"] == len(want) == 9
    actor_rows = {r["image_uri"]: r for r in read_rows(out)}
    served = read_rows(serve_out)
    assert sorted(r["image_uri"] for r in served) == want
    for row in served:
        ref = actor_rows[row["image_uri"]]
        for k in R.RESULT_FIELDS:
            if k in ("scored_at",):
                continue
            if k == "model_uri":  # the service names a local model by its folder, never its server path
                from iqa_spider.model.loading import public_model_uri

                assert row[k] == public_model_uri(ref[k]), (row[k], ref[k])
            elif k == "level_probs":
                assert row[k] == pytest.approx(ref[k], abs=1e-4), k
            elif k == "score":
                assert row[k] == pytest.approx(ref[k], abs=1e-4)
            elif k == "regions":
                assert [(g["answer"], g["mask_rle"], g["mask_area"]) for g in row[k]] == \
                    [(g["answer"], g["mask_rle"], g["mask_area"]) for g in ref[k]], row["image_uri"]
                for g, h in zip(row[k], ref[k]):
                    for f in ("point_x", "point_y", "p_right", "p_bottom"):
                        assert (g[f] is None) == (h[f] is None) and (g[f] is None or abs(g[f] - h[f]) < 1e-3), f
            else:
                assert row[k] == ref[k], (k, row["image_uri"])


# ------------------------------------------------------------------ ray job submit

def test_ray_job_submit_on_a_ray_head(ray_head, moto_s3, s3_inputs, tiny_model_dir):
    from iqa_spider.submit import client, wait

    input_uri, expect, _ = s3_inputs
    out = moto_s3.uri("score-out", "submitted")
    job_id = f"score-{os.getpid()}"
    # the moto endpoint and its test keys are not secrets; a real job gets them from the nodes
    # excludes as docs/jobs.md: other jobs' outputs in the checkout (demo_out, mlruns) may change while zipping
    renv = {"py_modules": ["platform/iqa_spider"], "excludes": EXCLUDES,
            "env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                    "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}}
    r = ray_job_submit(ray_head, renv, job_id, [
        "python", "jobs/score.py", "--config", "configs/score.yaml", f"model.path={tiny_model_dir}",
        f"input.uri={input_uri}/a", f"output.uri={out}", "infer.max_new_tokens=8",
        f"infer.max_pixels={MAX_PIXELS}", "scoring.num_cpus=0.5"])
    assert r.returncode == 0, r.stdout + r.stderr
    status = wait(job_id, ray_head, timeout=240).value
    logs = client(ray_head).get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "connected to Ray at" in logs and "score summary" in logs
    want = sorted(k for k in expect if k.startswith(f"{input_uri}/a/"))
    assert sorted(r["image_uri"] for r in read_rows(out)) == want
    summary = json.loads(storage.read_bytes(f"{out}/_summary.json"))
    assert summary["rows"] == len(want) and summary["ignored_files"] == 2


# ------------------------------------------------------------------ backend serve without Serve

def test_backend_serve_without_a_running_app_is_a_config_error_before_scoring(ray_local, tiny_model_dir, tmp_path,
                                                                              monkeypatch, capsys):
    """backend=serve on a cluster with no running Serve application: exit 2 with one line naming
    key 'backend' (check_serve), and not a single block handed to Ray Data or written."""
    from ray import serve

    from iqa_spider.score import job

    app = "iqa-spider"
    status = serve.status().applications.get(app)
    assert status is None or str(getattr(status.status, "value", status.status)) != "RUNNING"  # precondition
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"p{i}.png").write_bytes(_png(Image.new("RGB", (32, 24), (40 * i, 90, 200))))
    built = []
    monkeypatch.setattr(job, "build_dataset", lambda *a, **k: built.append(a) or pytest.fail("a block was scored"))
    out = tmp_path / "out"
    rc = job.main(["--config", str(REPO / "configs/score.yaml"), f"model.path={tiny_model_dir}",
                   f"input.uri={inputs}", f"output.uri={out}", "backend=serve", f"serve.app_name={app}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "key 'backend'" in err and f"no RUNNING Serve application '{app}'" in err, err
    assert built == []
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]  # no shard, no summary
