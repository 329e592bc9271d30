"""The environment variables a job's Ray workers need, in one list.

On a cluster, workers do not inherit the driver's environment, so every entry point passes
these names on explicitly: `submit` to the job's driver, batch scoring to its stages, Serve to
its replicas. The names are grouped by why each is there, because the groups travel differently.
Serve leaves the credentials to the pod's own environment; the others pass them only when
they are set in the shell that starts the work.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

# Secrets: S3 keys and MLflow credentials. Sent by name; the values are never written to a config.
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Where the services are: S3 (or MinIO) endpoints and region, and the MLflow server.
CONNECTION_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                  "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL")
# How the libraries behave: no hub downloads, quiet tokenizers.
RUNTIME_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
# Paths on the cluster's own nodes: the model cache folder. A job's driver passes it to its
# workers; `submit`, on another machine, does not send its own.
NODE_ENV = ("IQA_SPIDER_CACHE",)

# What `submit` sends to a job's driver, and what a job's driver (or Serve's builder) sends on.
SUBMIT_ENV = CREDENTIAL_ENV + CONNECTION_ENV + RUNTIME_ENV
WORKER_ENV = SUBMIT_ENV + NODE_ENV


def present_env(names: Iterable[str]) -> dict[str, str]:
    """This process's values of ``names``; unset or empty ones are left out."""
    return {k: os.environ[k] for k in names if os.environ.get(k)}


__all__ = ["CREDENTIAL_ENV", "CONNECTION_ENV", "RUNTIME_ENV", "NODE_ENV", "SUBMIT_ENV", "WORKER_ENV", "present_env"]
