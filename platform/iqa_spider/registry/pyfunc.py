"""The exported model as an MLflow pyfunc whose artifact is the plain HF directory.

Loading `models:/iqa-spider@champion` with `mlflow.pyfunc.load_model` gives a model that
scores a DataFrame of images; the inference engine instead downloads the artifact and loads
the HF directory directly (AutoModelForImageTextToText), so nothing but MLflow's storage
layout ties the two together.
"""
from __future__ import annotations

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
    """Log HF_DIR as the run's pyfunc model; register it as a new version. Returns the version."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=IQASpiderModel(), artifacts={HF_ARTIFACT: str(hf_dir)},
            signature=signature(), pip_requirements=["iqa-spider"])
    if not registered_model:
        return None
    version = mlflow.register_model(info.model_uri, registered_model, tags=tags)
    return str(version.version)
