"""The exported model as an MLflow pyfunc whose artifact is the plain HF directory.

Loading `models:/iqa-spider@champion` with `mlflow.pyfunc.load_model` gives a model that
scores a DataFrame of images; the inference engine instead downloads the artifact and loads
the HF directory directly (AutoModelForImageTextToText), so nothing but MLflow's storage
layout ties the two together.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

HF_ARTIFACT = "hf_model"
MODEL_NAME = "model"  # the logged model's name inside its run


def signature() -> Any:
    """MLflow passes `params` to predict only when the model declares them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "image_uri", required=False)])
    params = ParamSchema([ParamSpec("describe", "boolean", False), ParamSpec("ground", "boolean", False),
                          ParamSpec("ground_questions", "string", ""), ParamSpec("mapping", "string", "")])
    return ModelSignature(inputs=inputs, params=params)


class IQASpiderModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model_dir = context.artifacts[HF_ARTIFACT]
        self._predictor = None

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """DataFrame with `image` (bytes) or `image_uri` -> result-contract rows (score only by default)."""
        from iqa_spider.infer.pyfunc_backend import predict_frame  # infer is loaded only when serving

        if self._predictor is None:
            from iqa_spider.infer.pyfunc_backend import load_predictor

            self._predictor = load_predictor(self.model_dir)
        return predict_frame(self._predictor, model_input, params or {})


def log_and_register(client: Any, run_id: str, hf_dir: Path, registered_model: str | None,
                     tags: dict[str, str]) -> str | None:
    """Log HF_DIR as the run's pyfunc model; register it as a new version. Returns the version.

    Saved locally and uploaded with the client rather than `start_run(run_id)` + `log_model`:
    the fluent API refuses a run outside the process's active experiment, which any earlier
    `mlflow.set_experiment` in the same process (a notebook, another job) would have moved.
    """

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / MODEL_NAME
        mlflow.pyfunc.save_model(str(local), python_model=IQASpiderModel(), artifacts={HF_ARTIFACT: str(hf_dir)},
                                 signature=signature(), pip_requirements=["iqa-spider"])
        client.log_artifacts(run_id, str(local), artifact_path=MODEL_NAME)
    if not registered_model:
        return None
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(registered_model)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(registered_model, f"runs:/{run_id}/{MODEL_NAME}", run_id=run_id,
                                          tags=tags)
    return str(version.version)
