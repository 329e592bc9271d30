"""Model loading: local directory, MLflow registry (real `mlflow server`), device and dtype."""
import os
import shutil

import pytest

from iqa_spider.config.schemas import ModelConfig
from iqa_spider.infer.loading import (find_hf_dir, load_model, resolve_device, resolve_dtype,
                                      resolve_model_path)

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


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_model_dir):
    """The tiny model logged as the artifact of an MLflow pyfunc model (as training logs it),
    registered as versions 1 and 2, with alias champion on version 2."""
    import mlflow
    import mlflow.pyfunc
    from mlflow import MlflowClient

    class HFWrapper(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    name = "iqa-spider-loading-test"
    mlflow.set_experiment("infer-loading")
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=HFWrapper(),
                                       artifacts={"hf_model": str(tiny_model_dir)},
                                       registered_model_name=name, pip_requirements=[])
    second = mlflow.register_model(info.model_uri, name)  # a second version of the same artifacts
    versions = [str(info.registered_model_version), str(second.version)]
    runs = [run.info.run_id, run.info.run_id]
    MlflowClient().set_registered_model_alias(name, "champion", versions[1])
    return name, versions, runs


def test_mlflow_alias_version_and_run_uris(registered, tmp_path):
    name, versions, runs = registered
    cache = str(tmp_path / "cache")
    by_alias = resolve_model_path(f"models:/{name}@champion", cache)
    assert by_alias.version == versions[1] == "2"
    assert by_alias.run_id == runs[1]
    assert os.path.isfile(os.path.join(by_alias.local_dir, "config.json"))
    assert os.path.isfile(os.path.join(by_alias.local_dir, "model.safetensors"))
    assert resolve_model_path(f"models:/{name}/1", cache).version == "1"
    assert resolve_model_path(f"models:/{name}/latest", cache).version == "2"
    by_run = resolve_model_path(f"runs:/{runs[0]}/model", cache)
    assert by_run.version is None and by_run.run_id == runs[0]
    # a second resolve of the same version reuses the download
    again = resolve_model_path(f"models:/{name}@champion", cache)
    assert again.local_dir == by_alias.local_dir


def test_load_from_the_registry_reports_the_version(registered, tmp_path):
    from iqa_spider.infer.config import InferConfig
    from iqa_spider.infer.predictor import Predictor

    name, versions, _ = registered
    p = Predictor.load(ModelConfig(path=f"models:/{name}@champion", device="cpu"),
                       InferConfig(cache_dir=str(tmp_path / "cache")))
    assert p.model_uri == f"models:/{name}@champion" and p.model_version == "2"
    from PIL import Image

    s = p.score([Image.new("RGB", (40, 30), (200, 10, 10))])[0]
    assert 1 <= s.score <= 5


def test_unknown_mlflow_uri_fails_clearly(mlflow_server):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        resolve_model_path("models:/no-such-model@champion")
