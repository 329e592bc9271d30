"""MLflow tracking shared by every job: where the server is, what a run records about itself."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from iqa_spider.storage import redact

DEFAULT_LOCAL_STORE = "mlflow.db"


def tracking_uri(configured: str | None = None) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    if configured:
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(DEFAULT_LOCAL_STORE).resolve()}"


def redact_values(values: dict[str, Any]) -> dict[str, Any]:
    """Every string value redacted (params and tags before they are logged)."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


def local_artifact_location(uri: str, experiment: str) -> str | None:
    """Where a local sqlite store keeps an experiment's artifacts: beside the database.

    MLflow's default for a store without a server is ``./mlruns`` under the *working
    directory*, so a job run from the repository root would scatter artifacts there instead of
    keeping them with the database it names. None for a server (it has its own root).
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment).as_uri()


def experiment_id(client: Any, name: str) -> str:
    """Get or create an experiment by name through the client (no process-wide active experiment)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=local_artifact_location(client.tracking_uri, name))
    except MlflowException:  # another job created it between the two calls
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def config_hash(cfg_yaml: str) -> str:
    return hashlib.sha256(cfg_yaml.encode()).hexdigest()[:12]


def system_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
    }

    for pkg in ("transformers", "peft", "deepspeed", "ray", "mlflow"):
        try:  # from the installed metadata: importing deepspeed & co. on the driver costs seconds
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "missing"
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def log_dict_artifact(client: Any, run_id: str, data: dict, name: str) -> None:
    client.log_text(run_id, json.dumps(data, indent=2, default=str), name)
