"""Load the model and processor from wherever the config points.

``ModelConfig.path`` may be

- a local HF directory (what ``init-tiny`` and ``save_pretrained`` write);
- an MLflow model URI: ``models:/name@alias``, ``models:/name/3``, ``models:/name/latest``,
  or ``runs:/<run_id>/<path>``. The artifacts are downloaded (once per resolved version, into
  a cache folder) and the HF directory inside them is found: the first folder, breadth
  first, that holds a ``config.json`` (the training job logs it under ``artifacts/hf_model``
  of a pyfunc model). An alias is resolved to its version *before* the download, so the
  version reported in every result row is the one that was loaded even if the alias moves;
- an ``s3://`` (or ``file://``) folder of an HF directory, copied to the cache folder;
- an HF hub id (only where the hub is reachable, or already in the local HF cache).

dtype ``auto`` is bfloat16 on CUDA and float32 on CPU; device ``auto`` is CUDA when present.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iqa_spider import storage
from iqa_spider.config.schemas import ModelConfig
from iqa_spider.model.processor import load_processor
from iqa_spider.storage import redact

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<ref>[^/]+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[^/]+)(?:/(?P<path>.*))?$")


def registered_name(uri: str) -> str | None:
    """The registered model a ``models:/name...`` URI names, else None."""
    found = _MODELS_URI.match(uri)
    return found["name"] if found else None


def public_model_uri(uri: str) -> str:
    """The model's name as a service may show it to clients: registry, run and bucket URIs as
    they are; a local folder as ``local:<folder name>``, never the server's path (which names
    its user, its disks and its cache)."""
    if is_mlflow_uri(uri) or uri.startswith(("s3://", "s3a://")):
        return uri
    name = Path(uri.removeprefix("file://").rstrip("/")).name
    return f"local:{name or 'model'}"


def default_cache_dir() -> str:
    return os.environ.get("IQA_SPIDER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "iqa-spider", "models"))


def is_mlflow_uri(path: str) -> bool:
    return str(path).startswith(("models:/", "runs:/"))


@dataclass
class ResolvedModel:
    uri: str                 # as configured
    local_dir: str           # the HF directory that is loaded
    version: str | None      # registry version (models:/ URIs), else None
    run_id: str | None = None


def find_hf_dir(root: str | os.PathLike) -> Path:
    """The first folder under ``root`` (breadth first, sorted) that holds a config.json."""
    root = Path(root)
    queue: deque[Path] = deque([root])
    while queue:
        d = queue.popleft()
        if (d / "config.json").is_file():
            return d
        queue.extend(sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")))
    raise FileNotFoundError(f"no HF model directory (a folder with config.json) under {root}")


def resolve_mlflow_version(uri: str, tracking_uri: str | None = None) -> tuple[str | None, str | None, str]:
    """(version, run_id, download_uri) of an MLflow model URI.

    ``models:/name@alias`` and ``models:/name/latest`` are pinned to a version number, and the
    download URI names that version, so what is reported is what was downloaded.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    registry = tracking_uri or mlflow.get_tracking_uri()  # None: MLFLOW_TRACKING_URI, else ./mlflow.db
    if registry.startswith("sqlite:///") and not Path(registry[len("sqlite:///"):]).is_file():
        # Opening it would create an empty registry (and leave it in the working directory),
        # then report "no such model": say where it looked instead.
        raise FileNotFoundError(f"no MLflow registry at {redact(registry)} (no such file); set MLFLOW_TRACKING_URI "
                                "or model.tracking_uri to the registry that holds the model")
    try:
        return _resolve_in(MlflowClient(registry), uri)
    except MlflowException as exc:
        raise LookupError(f"{uri} is not in the registry at {redact(registry)}: {exc.message}") from None
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc} (registry {redact(registry)})") from None


def _resolve_in(client, uri: str) -> tuple[str | None, str | None, str]:
    m = _MODELS_URI.match(uri)
    if m:
        name = m.group("name")
        if m.group("alias"):
            mv = client.get_model_version_by_alias(name, m.group("alias"))
        elif m.group("ref").isdigit():
            mv = client.get_model_version(name, m.group("ref"))
        elif m.group("ref").lower() == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise FileNotFoundError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:  # a legacy stage name (Staging, Production)
            found = client.get_latest_versions(name, stages=[m.group("ref")])
            if not found:
                raise FileNotFoundError(f"registered model {name!r} has no version in stage {m.group('ref')!r}")
            mv = found[0]
        return str(mv.version), mv.run_id, f"models:/{name}/{mv.version}"
    r = _RUNS_URI.match(uri)
    if r:
        return None, r.group("run"), uri
    raise ValueError(f"not an MLflow model URI: {uri!r} (expected models:/name@alias, models:/name/N or runs:/id/path)")


def _cache_slot(cache_dir: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key)[:80]
    return Path(cache_dir) / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _download_once(slot: Path, fetch) -> Path:
    """Run ``fetch(tmp_dir)`` into a temporary sibling and move it into ``slot`` when done, so
    a killed download never leaves a half model under the final name."""
    if slot.is_dir():
        return slot
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=slot.parent))
    try:
        fetch(str(tmp))
        try:
            os.replace(tmp, slot)
        except OSError:  # another process finished first
            if not slot.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return slot


def _fetch_s3_folder(uri: str, cache_dir: str) -> Path:
    """A local copy of the S3 folder ``uri``, one per content.

    The cache slot is named by the folder's listing (key, size, ETag), so a changed folder is
    fetched again while every process of a node that asks for the same content (training
    workers, Ray Data actors, scoring replicas) shares one copy: none deletes a folder another
    is loading from, and a 7B checkpoint is not pulled once per process. Old copies stay in
    the cache folder until removed (IQA_SPIDER_CACHE names it).
    """

    fs, root = storage.get_fs(uri)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listing = []
    for key, info in fs.find(root, detail=True).items():
        rel = key[len(root):].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden keys: the temporaries of unfinished atomic writes, among others
        listing.append((rel, info.get("size"), str(info.get("ETag") or info.get("etag") or "")))
    listing.sort()
    if not listing:
        raise FileNotFoundError(f"no files under {uri}")
    content = hashlib.sha256(repr(listing).encode()).hexdigest()[:16]
    slot = _cache_slot(cache_dir, f"{uri}|{content}")

    def fetch(tmp: str) -> None:
        log.info("copying %s (%d files) to %s", uri, len(listing), slot)
        for rel, _, _ in listing:
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(dst))

    return _download_once(slot, fetch)


def resolve_model_path(path: str, cache_dir: str | None = None, tracking_uri: str | None = None) -> ResolvedModel:
    """Turn ``model.path`` into a local HF directory (downloading if needed); MLflow URIs are
    read from ``tracking_uri`` (None: MLFLOW_TRACKING_URI)."""
    path = str(path)
    cache_dir = cache_dir or default_cache_dir()
    if is_mlflow_uri(path):
        import mlflow.artifacts

        version, run_id, download_uri = resolve_mlflow_version(path, tracking_uri)
        tracking = tracking_uri or mlflow.get_tracking_uri()
        # The run id is part of the key: "version 1 of iqa-spider" on a store that was wiped and
        # filled again (a rerun demo, a fresh test server on a reused port) is another model.
        slot = _cache_slot(cache_dir, f"{tracking}|{download_uri}|{run_id}")

        def fetch(tmp: str) -> None:
            log.info("downloading %s (%s) from MLflow", path, download_uri)
            source = download_uri
            pinned = _MODELS_URI.match(download_uri)
            if pinned:  # MLflow's models:/ repository asks the process-wide registry, not ours
                from mlflow import MlflowClient

                source = MlflowClient(tracking_uri).get_model_version_download_uri(pinned.group("name"),
                                                                                   pinned.group("ref"))
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri)

        root = _download_once(slot, fetch)
        return ResolvedModel(path, str(find_hf_dir(root)), version, run_id)
    if path.startswith(("s3://", "s3a://", "file://")):
        if path.startswith("file://"):
            return ResolvedModel(path, str(find_hf_dir(path[len("file://"):])), None)
        return ResolvedModel(path, str(find_hf_dir(_fetch_s3_folder(path, cache_dir))), None)
    local = Path(os.path.expanduser(path))
    if local.exists():
        return ResolvedModel(path, str(find_hf_dir(local)), None)
    # Anything else is taken for a hub id; transformers resolves it (offline: its local cache).
    return ResolvedModel(path, path, None)


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    uri: str
    version: str | None
    local_dir: str
    device: Any
    dtype: Any


def load_model(cfg: ModelConfig, cache_dir: str | None = None) -> LoadedModel:
    """Model (eval mode, on its device) and processor (left padding) for ``cfg``."""
    from transformers import AutoModelForImageTextToText

    resolved = resolve_model_path(cfg.path, cache_dir, cfg.tracking_uri)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    processor = load_processor(resolved.local_dir, cfg.min_pixels, cfg.max_pixels)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(
        resolved.local_dir, dtype=dtype, attn_implementation=cfg.attn_implementation)
    model.to(device).eval()
    model_type = getattr(model.config, "model_type", "")
    if model_type and model_type != cfg.family:
        log.warning("model.family is %s but %s is a %s checkpoint", cfg.family, resolved.local_dir, model_type)
    log.info("loaded %s (version %s) from %s on %s as %s", resolved.uri, resolved.version, resolved.local_dir,
             device, str(dtype).replace("torch.", ""))
    return LoadedModel(model, processor, resolved.uri, resolved.version, resolved.local_dir, device, dtype)


__all__ = ["LoadedModel", "ResolvedModel", "load_model", "resolve_model_path", "resolve_mlflow_version",
           "find_hf_dir", "resolve_device", "resolve_dtype", "is_mlflow_uri", "default_cache_dir"]
