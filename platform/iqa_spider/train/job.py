"""The training job on the driver: check everything cheap first, then Ray Train, then MLflow.

Order matters for users: config, model path and data problems are found here in seconds,
before any worker is scheduled (exit code 2 with one line). Only then the MLflow run opens,
the Ray Data stream is built and TorchTrainer starts. Re-running the same config resumes
the same Ray Train run (same storage path and name) from its latest checkpoint.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from iqa_spider import storage, tracking
from iqa_spider.config import ConfigError, config_to_yaml
from iqa_spider.config.loader import config_to_flat_dict
from iqa_spider.config.schemas import TrainConfig
from iqa_spider.entrypoint import run_job
from iqa_spider.raycluster import ensure_ray
from iqa_spider.train.data import DataError, build_dataset, check_dataset
from iqa_spider.train.export import HF_DIR, REPORT_FILE
from iqa_spider.train.loop import fault_from_env, train_loop_per_worker

log = logging.getLogger(__name__)


def absolute_local_paths(cfg: TrainConfig) -> None:
    """Make the config's local paths absolute, in place, before it travels.

    Ray Train workers and Ray Data actors run in their own working directories, so a
    ``model.path=.cache/tiny`` that is right on the driver names nothing there. URIs and hub
    ids (no such local path) are left as they are.
    """
    def absolute(value: str | None, always_a_path: bool = False) -> str | None:
        if value is None or "://" in value:
            return value
        local = os.path.expanduser(value)
        if always_a_path or os.path.exists(local) or value.startswith((".", "/", "~")):
            return os.path.abspath(local)
        return value

    cfg.model.path = absolute(cfg.model.path)
    cfg.data.uri = absolute(cfg.data.uri)
    cfg.output.uri = absolute(cfg.output.uri, always_a_path=True)  # a folder to create, never a hub id
    cfg.checkpoint.resume_from = absolute(cfg.checkpoint.resume_from)


def check_before_start(cfg: TrainConfig) -> dict[str, int]:
    path = cfg.model.path
    if storage.is_s3(path):
        try:
            found = storage.exists(storage.join(path, "config.json"))
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint, bucket: say so before Ray starts
            raise ConfigError(f"cannot read {path}: {type(exc).__name__}: {exc}", key="model.path") from None
        if not found:
            raise ConfigError(f"{path} is not a model folder (no config.json)", key="model.path")
        looks_local = False
    else:
        looks_local = path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1
    if looks_local and not Path(os.path.expanduser(path), "config.json").is_file():
        raise ConfigError(f"{path} is not a model directory (no config.json)", key="model.path")
    if path.startswith(("models:/", "runs:/")):
        raise ConfigError("training starts from a local directory or hub id; download registry models "
                          "first (mlflow artifacts download)", key="model.path")
    try:
        return check_dataset(cfg)
    except DataError as exc:
        raise ConfigError(str(exc), key="data.uri") from None


def run_name(cfg: TrainConfig, cfg_yaml: str) -> str:
    return cfg.output.run_name or f"train-{tracking.config_hash(cfg_yaml)}"


def registered_version(client, model_name: str, checkpoint_path: str) -> str | None:
    """The version already registered from this export (a re-run of a finished run adds none)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.checkpoint = '{checkpoint_path}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(found[0].version) if found else None


def run_train(cfg: TrainConfig) -> dict:
    import mlflow
    import ray.train
    from mlflow.tracking import MlflowClient
    from ray.train.torch import TorchConfig, TorchTrainer

    from iqa_spider.registry.pyfunc import log_and_register

    absolute_local_paths(cfg)
    counts = check_before_start(cfg)
    cfg_yaml = config_to_yaml(cfg)
    name = run_name(cfg, cfg_yaml)
    log.info("train (%s): %s rows per task in split %s; run %s", cfg.method, counts, cfg.data.split, name)

    uri = tracking.tracking_uri(cfg.tracking.uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, cfg.tracking.experiment)
    tags = tracking.redact_values({"data_uri": cfg.data.uri, "git_commit": tracking.git_commit(),
                                   "config_hash": tracking.config_hash(cfg_yaml), "ray_run_name": name})
    run = client.create_run(experiment, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        params = {k: tracking.redact(str(v))[:500] for k, v in config_to_flat_dict(cfg).items()}
        mlflow.log_params(params, run_id=run_id)  # batches past MLflow's per-call limit
        client.log_text(run_id, tracking.redact(cfg_yaml), "config/train.yaml")
        tracking.log_dict_artifact(client, run_id, tracking.system_info(), "system_info.json")
        tracking.log_dict_artifact(client, run_id, counts, "data_counts.json")

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
        storage_fs, storage_path = storage.arrow_filesystem(cfg.output.uri)
        resume = None
        if cfg.checkpoint.resume_from:
            rfs, rpath = storage.arrow_filesystem(cfg.checkpoint.resume_from)
            resume = ray.train.Checkpoint(path=rpath, filesystem=rfs)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg, "mlflow": {"tracking_uri": uri, "run_id": run_id},
                               "fault": fault_from_env(), "run_uri": storage.join(cfg.output.uri, name)},
            torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(2, cfg.checkpoint.keep))),
            datasets={"train": build_dataset(cfg, counts)},
            resume_from_checkpoint=resume,
        )
        started = time.monotonic()
        result = trainer.fit()
        if result.error:
            raise result.error
        checkpoint = result.checkpoint
        checkpoint_uri = storage.arrow_path_uri(cfg.output.uri, checkpoint.path)
        version = None
        tags["checkpoint"] = checkpoint_uri
        with checkpoint.as_directory() as d:
            export_report = Path(d, REPORT_FILE).read_text()
            client.log_text(run_id, export_report, "export/export.json")
            version = registered_version(client, cfg.tracking.registered_model, checkpoint_uri)
            if cfg.tracking.register and version is None:
                version = log_and_register(client, run_id, Path(d, HF_DIR), cfg.tracking.registered_model, tags)
        client.log_metric(run_id, "wall_seconds", time.monotonic() - started)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    summary = {"run_id": run_id, "ray_run": name, "checkpoint": checkpoint_uri,
               "registered_model": cfg.tracking.registered_model if version else None,
               "model_version": version, "metrics": dict(result.metrics or {})}
    log.info("train finished: %s", summary)
    print(f"trained: MLflow run {run_id}; export at {storage.join(checkpoint_uri, HF_DIR)}"
          + (f"; registered {cfg.tracking.registered_model} version {version}" if version else ""))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(TrainConfig, run_train, argv,
                   description="train: LoRA or full fine-tuning, DeepSpeed ZeRO on Ray Train")


