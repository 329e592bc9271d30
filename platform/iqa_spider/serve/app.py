"""``build_app(args)``: the Ray Serve application, built from the serving config.

    serve run serving.app:build_app                         # defaults: models:/iqa-spider@champion
    serve run serving.app:build_app model.path=/models/tiny deployments.model.num_gpus=1
    serve run serving/config.yaml                           # or serve deploy serving/config.yaml

``args`` are the Serve application args (see :func:`iqa_spider.serve.config.load_serve_config`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from iqa_spider.config.loader import ConfigError
from iqa_spider.serve.config import ServeAppConfig, load_serve_config

log = logging.getLogger("ray.serve")


def build_app(args: Mapping[str, Any] | None = None):
    """Serve application builder: args -> validated config -> bound deployments."""
    from ray.serve.exceptions import RayServeException

    from iqa_spider.serve.deployments import build_application

    try:
        cfg = args if isinstance(args, ServeAppConfig) else load_serve_config(args)
    except ConfigError as exc:
        # Serve reports a RayServeException by its message alone (any other exception as its
        # whole traceback, retried): one line naming the key, as the jobs print it.
        raise RayServeException(str(exc)) from None
    log.info("building IQA-Spider serving app for %s", cfg.model.path)
    return build_application(cfg)


__all__ = ["build_app"]
