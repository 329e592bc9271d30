"""The serving application's typed config (job kind ``serve``).

Ray Serve hands the build function ``args``: a dict from the ``args:`` block of a Serve
config file (``serving/config.yaml``, a RayService's ``serveConfigV2``) or the ``key=value``
words of ``serve run serving.app:build_app key=value ...``. :func:`load_serve_config` turns
it into a :class:`ServeAppConfig`, layered like every job config of the project:

    schema defaults <- args["config"] (a YAML file with ``job: serve``, optional)
                    <- nested sections of args ({"model": {"path": ...}})
                    <- dotted keys of args ({"model.path": "..."}, strings parsed as YAML)

An unknown key, a wrong type or a value the schema refuses raises ``ConfigError`` naming the
key, before any replica starts. Nothing here imports Ray or torch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from iqa_spider.config.loader import ConfigError, ConfigValueError, build_config, check_at_least, read_yaml
from iqa_spider.config.schemas import ModelConfig
from iqa_spider.environment import CONNECTION_ENV, NODE_ENV, RUNTIME_ENV
from iqa_spider.infer.config import InferConfig, SegmenterConfig

DEFAULT_MODEL_URI = "models:/iqa-spider@champion"

# Image types a client may send (checked against the declared type of an upload *and* the
# type sniffed from the bytes).
DEFAULT_IMAGE_TYPES = ["image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif"]

# Environment variables copied from the process that builds the app into every replica
# (when set there). Names only: the values are read at build time, never written in a config.
# Secrets (AWS keys, MLflow tokens) belong in the pod/node environment, which replicas inherit;
# add their names here only where that is not possible (a local test cluster).
DEFAULT_FORWARD_ENV = [*CONNECTION_ENV, *RUNTIME_ENV, *NODE_ENV]


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigValueError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class AutoscalingSettings:
    """Ray Serve autoscaling of one deployment (used instead of num_replicas when enabled)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0   # per replica; the model's batch size is a good start
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def as_serve(self) -> dict[str, Any]:
        out = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
               "target_ongoing_requests": self.target_ongoing_requests,
               "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


@dataclass
class ModelDeploymentSettings:
    """The VLM predictor: one model per replica, dynamic batching across requests."""

    num_replicas: int = 1
    num_gpus: float = 0.0            # per replica: 1 on a GPU node (the model goes to cuda with model.device=auto)
    # CPU shares are Ray scheduling units. The defaults add up to 1.75 (model 1, grounding 0.5,
    # ingress 0.25) so the app starts on a 2-core machine; at 2.5 the ingress waited for a CPU
    # for ever. A GPU cluster sets its own (infra/k8s/rayservice.yaml).
    num_cpus: float = 1.0
    max_ongoing_requests: int = 64   # must exceed max_batch_size, or batches never fill
    max_queued_requests: int = -1    # -1: unbounded (the ingress queue bounds the load)
    max_batch_size: int = 8          # images per @serve.batch call
    batch_wait_timeout_s: float = 0.02
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)


@dataclass
class GroundingDeploymentSettings:
    """The grounding head's segmenter (points -> masks)."""

    num_replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    max_ongoing_requests: int = 16
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)


@dataclass
class IngressSettings:
    """The FastAPI ingress: parsing, limits, decoding, fan-out."""

    num_replicas: int = 1
    num_cpus: float = 0.25
    max_ongoing_requests: int = 256
    max_queued_requests: int = 512   # beyond this Serve answers 503 at once instead of queueing
    autoscaling: AutoscalingSettings = field(default_factory=AutoscalingSettings)


@dataclass
class DeploymentsConfig:
    model: ModelDeploymentSettings = field(default_factory=ModelDeploymentSettings)
    grounding: GroundingDeploymentSettings = field(default_factory=GroundingDeploymentSettings)
    ingress: IngressSettings = field(default_factory=IngressSettings)


@dataclass
class LimitsConfig:
    """What a request may be. Every refusal is a 4xx JSON error naming the limit."""

    max_body_bytes: int = 20 * 1024 * 1024    # whole request body (413 body_too_large)
    max_pixels: int = 25_000_000              # decoded pixels, read from the header before decoding (413)
    allowed_content_types: list[str] = field(default_factory=lambda: list(DEFAULT_IMAGE_TYPES))  # else 415
    request_timeout_s: float = 60.0           # whole request, model included (408 timeout)
    allowed_s3_buckets: list[str] = field(default_factory=list)  # image_uri buckets; empty: s3 off (403)
    max_questions: int = 8                    # ground + refer + describe_regions texts per request (422)
    max_text_chars: int = 500                 # per question / region text (422)
    # Decoded image memory held by the requests in flight, per ingress replica: a request waits
    # for its share (408 after request_timeout_s); one that alone needs more gets 413. The
    # count of requests (max_ongoing_requests) does not bound memory: one 25 MP image costs
    # about 200 MB decoded, an 84 KB PNG can be one.
    max_decoded_mb_in_flight: int = 1024


@dataclass
class ServeAppConfig:
    job: str = "serve"
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=DEFAULT_MODEL_URI))
    infer: InferConfig = field(default_factory=InferConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    deployments: DeploymentsConfig = field(default_factory=DeploymentsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    forward_env: list[str] = field(default_factory=lambda: list(DEFAULT_FORWARD_ENV))

    def __post_init__(self) -> None:
        d = self.deployments
        for name, s in (("model", d.model), ("grounding", d.grounding), ("ingress", d.ingress)):
            key = f"deployments.{name}"
            check_at_least(1, (f"{key}.num_replicas", s.num_replicas),
                           (f"{key}.max_ongoing_requests", s.max_ongoing_requests))
            _check_positive(f"{key}.num_cpus", s.num_cpus, allow_zero=True)
            if hasattr(s, "num_gpus"):
                _check_positive(f"{key}.num_gpus", s.num_gpus, allow_zero=True)
            a = s.autoscaling
            if a.enabled and not (0 <= a.min_replicas <= a.max_replicas and a.max_replicas >= 1):
                raise ConfigValueError(f"{key}.autoscaling.min_replicas",
                                       f"need 0 <= min_replicas <= max_replicas, max >= 1 "
                                       f"(got {a.min_replicas}, {a.max_replicas})")
        check_at_least(1, ("deployments.model.max_batch_size", d.model.max_batch_size))
        if d.model.max_ongoing_requests < d.model.max_batch_size:
            raise ConfigValueError("deployments.model.max_ongoing_requests",
                                   f"must be >= max_batch_size ({d.model.max_batch_size}) or batches never fill")
        _check_positive("deployments.model.batch_wait_timeout_s", d.model.batch_wait_timeout_s, allow_zero=True)
        lim = self.limits
        check_at_least(1, *((f"limits.{key}", getattr(lim, key))
                            for key in ("max_body_bytes", "max_pixels", "max_text_chars",
                                        "max_decoded_mb_in_flight")))
        check_at_least(0, ("limits.max_questions", lim.max_questions))
        _check_positive("limits.request_timeout_s", lim.request_timeout_s)
        bad = [t for t in lim.allowed_content_types if not t.startswith("image/")]
        if bad:
            raise ConfigValueError("limits.allowed_content_types", f"only image/* types may be allowed, got {bad}")
        self.limits.allowed_content_types = [t.lower() for t in lim.allowed_content_types]
        for b in lim.allowed_s3_buckets:
            if not b or "/" in b:
                raise ConfigValueError("limits.allowed_s3_buckets", f"a bucket name without '/', got {b!r}")


def load_serve_config(args: Mapping[str, Any] | None = None) -> ServeAppConfig:
    """Serve's ``args`` -> :class:`ServeAppConfig` (see the module doc for the layers)."""
    args = dict(args or {})
    layers: list[tuple[str, DictConfig]] = []
    path = args.pop("config", None)
    if path is not None:
        node = read_yaml(Path(str(path)).resolve())
        if node.get("job", "serve") != "serve":
            raise ConfigError(f"expected job: serve, got {node.get('job')!r}", key="job", source=str(path))
        layers.append((str(path), node))
    nested = {k: v for k, v in args.items() if "." not in k}
    dotted = {k: v for k, v in args.items() if "." in k}
    if nested:
        try:
            layers.append(("serve args", OmegaConf.create(nested)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"not a config mapping: {exc}", source="serve args") from None
    if dotted:
        # `serve run app:build_app a.b=c` passes strings: parse them as YAML, as a dotlist does.
        node = OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotted.items() if isinstance(v, str)])
        for k, v in dotted.items():
            if not isinstance(v, str):
                OmegaConf.update(node, k, v, merge=True)
        layers.append(("serve args", node))
    return build_config(ServeAppConfig, layers)


def config_to_args(cfg: ServeAppConfig) -> dict[str, Any]:
    """The config as plain nested data (what deployments receive; JSON/YAML-safe)."""
    return dataclasses.asdict(cfg)


def config_from_args(data: Mapping[str, Any]) -> ServeAppConfig:
    """Inverse of :func:`config_to_args` (in a replica), validated again."""
    return load_serve_config(dict(data))


def check_serve_config_file(path: str | Path) -> dict[str, ServeAppConfig]:
    """Validate every application's ``args`` of a Serve config file (``serving/config.yaml``):
    {application name: config}. Raises ConfigError naming the application and key."""
    node = read_yaml(Path(path).resolve())
    apps = node.get("applications")
    if not apps:
        raise ConfigError("a Serve config needs an `applications` list", key="applications", source=str(path))
    out = {}
    for i, app in enumerate(apps):
        name = app.get("name", f"app{i}")
        args = OmegaConf.to_container(app.get("args") or {}, resolve=True)
        try:
            out[name] = load_serve_config(args)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(exc.detail, f"applications[{name}].args.{exc.key}" if exc.key else None,
                              str(path)) from None
    return out


__all__ = ["ServeAppConfig", "LimitsConfig", "DeploymentsConfig", "ModelDeploymentSettings",
           "GroundingDeploymentSettings", "IngressSettings", "AutoscalingSettings", "load_serve_config",
           "config_to_args", "config_from_args", "check_serve_config_file", "DEFAULT_MODEL_URI",
           "DEFAULT_IMAGE_TYPES", "DEFAULT_FORWARD_ENV"]
