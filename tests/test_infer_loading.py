"""Model loading: local directory, MLflow registry (real `mlflow server`), device and dtype."""
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import register_model
from iqa_spider.config.schemas import ModelConfig
from iqa_spider.model.loading import find_hf_dir, load_model, resolve_device, resolve_dtype, resolve_model_path

torch = pytest.importorskip("torch")


def test_local_directory(tiny_model_dir):
    loaded = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    assert loaded.version is None and loaded.local_dir == str(tiny_model_dir)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert not loaded.model.training
    assert loaded.processor.tokenizer.padding_side == "left"


def test_pixel_bounds_and_dtype_override(tiny_model_dir):
    loaded = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu", dtype="bfloat16",
                                    min_pixels=56 * 56, max_pixels=112 * 112))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.processor.image_processor.size["longest_edge"] == 112 * 112
    assert loaded.processor.image_processor.size["shortest_edge"] == 56 * 56


def test_auto_device_and_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


def test_find_hf_dir(tmp_path, tiny_model_dir):
    nested = tmp_path / "model" / "artifacts" / "hf_model"
    shutil.copytree(tiny_model_dir, nested)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    assert find_hf_dir(tmp_path) == nested
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        find_hf_dir(tmp_path / "empty")


# A fixed image: the scores of two models on it tell which model answered.
def fixed_image():
    from PIL import Image

    return Image.new("RGB", (40, 30), (200, 10, 10))


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_hashes(root) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reversed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with the lm_head rows of the five level words in reverse order: another
    model (other weight bytes) whose level probabilities are exactly the tiny model's reversed."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from iqa_spider.model.tokenizer import word_token_id
    from iqa_spider.vocab import LEVEL_WORDS

    dst = tmp_path_factory.mktemp("loading") / "reversed"
    shutil.copytree(tiny_model_dir, dst)
    tensors = load_file(dst / "model.safetensors")
    tok = AutoTokenizer.from_pretrained(dst)
    ids = [word_token_id(tok, w) for w in LEVEL_WORDS]
    w = tensors["lm_head.weight"]
    w[ids] = w[ids[::-1]].clone()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    assert sha256(dst / "model.safetensors") != sha256(tiny_model_dir / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def local_probs(tiny_model_dir):
    """The tiny model's level probabilities on the fixed image, loaded from its local directory."""
    from iqa_spider.infer.predictor import Predictor

    p = Predictor.load(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    probs = p.score([fixed_image()])[0].level_probs
    # far from symmetric: the reversed model's answer differs by much more than any tolerance
    assert max(abs(a - b) for a, b in zip(probs, probs[::-1])) > 0.5, probs
    return probs


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_model_dir, reversed_dir):
    """Two models logged as the artifact of an MLflow pyfunc model (as training logs it):
    version 1 is ``reversed_dir``, version 2 the tiny model (one run each), with alias champion
    on version 2. Loading the wrong version gives other bytes and other scores."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = "iqa-spider-loading-test"
    versions = [register_model(client, name, d, "infer-loading") for d in (reversed_dir, tiny_model_dir)]
    runs = [client.get_model_version(name, v).run_id for v in versions]
    client.set_registered_model_alias(name, "champion", versions[1])
    return name, versions, runs


def test_mlflow_alias_version_and_run_uris(registered, tiny_model_dir, reversed_dir, tmp_path):
    name, versions, runs = registered
    cache = str(tmp_path / "cache")
    tiny, other = file_hashes(tiny_model_dir), file_hashes(reversed_dir)
    by_alias = resolve_model_path(f"models:/{name}@champion", cache)
    assert by_alias.version == versions[1] == "2"
    assert by_alias.run_id == runs[1]
    # the HF directory found in the download is the champion's, byte for byte
    assert file_hashes(by_alias.local_dir) == tiny
    v1 = resolve_model_path(f"models:/{name}/1", cache)
    assert v1.version == "1" and file_hashes(v1.local_dir) == other
    latest = resolve_model_path(f"models:/{name}/latest", cache)
    assert latest.version == "2" and file_hashes(latest.local_dir) == tiny
    by_run = resolve_model_path(f"runs:/{runs[0]}/model", cache)
    assert by_run.version is None and by_run.run_id == runs[0]
    assert file_hashes(by_run.local_dir) == other
    # a second resolve of the same version reuses the download
    again = resolve_model_path(f"models:/{name}@champion", cache)
    assert again.local_dir == by_alias.local_dir


def test_load_from_the_registry_reports_the_version(registered, local_probs, tmp_path):
    from iqa_spider.infer.config import InferConfig
    from iqa_spider.infer.predictor import Predictor

    name, versions, _ = registered
    infer = InferConfig(cache_dir=str(tmp_path / "cache"))
    p = Predictor.load(ModelConfig(path=f"models:/{name}@champion", device="cpu"), infer)
    assert p.model_uri == f"models:/{name}@champion" and p.model_version == "2"
    # the model that answers is version 2 (the tiny model), not only reported as it
    champion = p.score([fixed_image()])[0].level_probs
    np.testing.assert_allclose(champion, local_probs, atol=1e-6)
    v1 = Predictor.load(ModelConfig(path=f"models:/{name}/1", device="cpu"), infer)
    assert v1.model_version == "1"
    np.testing.assert_allclose(v1.score([fixed_image()])[0].level_probs, local_probs[::-1], atol=1e-6)


def test_unknown_mlflow_uri_fails_clearly(mlflow_server, tmp_path):
    """A registry miss names the registry it asked; a registry that does not exist is said to
    be missing, not created empty (MLflow's default, ./mlflow.db, would be) and then searched."""
    with pytest.raises(LookupError, match=f"no-such-model@champion is not in the registry at {mlflow_server.uri}"):
        resolve_model_path("models:/no-such-model@champion")
    with pytest.raises(FileNotFoundError, match=f"no MLflow registry at sqlite:///{tmp_path}/mlflow.db"):
        resolve_model_path("models:/iqa-spider@champion", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert list(tmp_path.iterdir()) == []   # nothing created
    secret = mlflow_server.uri.replace("http://", "http://me:pa55@")
    with pytest.raises(LookupError, match=r"registry at http://\*\*\*@127\.0\.0\.1") as err:
        resolve_model_path("models:/no-such-model@champion", tracking_uri=secret)
    assert "pa55" not in str(err.value)


def test_s3_folder_is_fetched_once_per_content(tiny_model_dir, moto_s3, tmp_path):
    from iqa_spider import storage

    uri = f"s3://{moto_s3.bucket}/models/tiny-{tmp_path.name}"
    assert storage.copy_tree(str(tiny_model_dir), uri) == len([p for p in tiny_model_dir.rglob("*") if p.is_file()])
    cache = str(tmp_path / "cache")
    first = resolve_model_path(uri, cache)
    again = resolve_model_path(uri, cache)
    # same content: the same local copy, not a fresh fetch that could pull it from under a reader
    assert first.local_dir == again.local_dir and first.version is None
    assert os.path.isfile(os.path.join(first.local_dir, "model.safetensors"))
    # the copy is the uploaded folder byte for byte, and what loads from it is that model
    assert file_hashes(first.local_dir) == file_hashes(tiny_model_dir)
    from_s3 = load_model(ModelConfig(path=uri, device="cpu"), cache)
    assert from_s3.local_dir == first.local_dir
    want = load_model(ModelConfig(path=str(tiny_model_dir), device="cpu")).model.state_dict()
    got = from_s3.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    # a changed folder is fetched again, into its own slot
    storage.write_bytes(storage.join(uri, "generation_config.json"), b'{"do_sample": false}')
    changed = resolve_model_path(uri, cache)
    assert changed.local_dir != first.local_dir
    assert open(os.path.join(changed.local_dir, "generation_config.json")).read() == '{"do_sample": false}'
    assert os.path.isdir(first.local_dir)  # the old copy is left for whoever still reads it
    # an unfinished atomic write (a hidden temporary key) is neither content nor copied
    storage.write_bytes(storage.join(uri, ".tmp-123-model.safetensors"), b"half")
    assert resolve_model_path(uri, cache).local_dir == changed.local_dir

    with pytest.raises(FileNotFoundError, match="no files under"):
        resolve_model_path(f"s3://{moto_s3.bucket}/models/absent", cache)


def test_a_store_filled_again_is_not_served_from_the_old_download(tmp_path):
    """`models:/m/1` of a wiped and refilled tracking store (a rerun demo) is another model:
    the cache must not hand back the first store's files. Each generation is its own process,
    as two demo runs are."""
    import subprocess
    import sys

    script = """
import json, os, sys, mlflow, mlflow.pyfunc
from iqa_spider.model.loading import resolve_model_path
class Noop(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input
hf = sys.argv[1]
os.makedirs(hf)
json.dump({"generation": hf}, open(os.path.join(hf, "config.json"), "w"))
with mlflow.start_run():
    mlflow.pyfunc.log_model(name="model", python_model=Noop(), artifacts={"hf_model": hf},
                            registered_model_name="m", pip_requirements=[])
print(json.load(open(os.path.join(resolve_model_path("models:/m/1", sys.argv[2]).local_dir, "config.json")))["generation"])
"""
    # none of the session's MLflow settings (an experiment id of the test server, say) leak in
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = []
    for generation in ("first", "second"):
        hf = str(tmp_path / generation)
        r = subprocess.run([sys.executable, "-c", script, hf, str(tmp_path / "cache")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        seen.append(r.stdout.strip().splitlines()[-1])
        # wipe the store as a rerun of the demo does (rm -rf demo_out)
        shutil.rmtree(tmp_path / "mlruns")
        os.remove(tmp_path / "mlflow.db")
    assert seen == [str(tmp_path / "first"), str(tmp_path / "second")]


def test_a_served_model_is_named_not_located():
    """What a service shows of model.path: registry, run and bucket URIs as given; a local
    folder by its name only (its path names the server's user and disks)."""
    from iqa_spider.model.loading import public_model_uri

    for shown in ("models:/iqa-spider@champion", "models:/iqa-spider/3", "runs:/0a1b/export", "s3://models/iqa/v3"):
        assert public_model_uri(shown) == shown
    assert public_model_uri("/home/alice/.cache/iqa-spider/models/ab12/export/") == "local:export"
    assert public_model_uri("file:///srv/models/small-qwen") == "local:small-qwen"
