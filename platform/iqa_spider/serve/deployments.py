"""The Ray Serve deployments: model (VLM predictor), grounding head (segmenter), ingress.

``IQAModel``      one :class:`~iqa_spider.infer.predictor.Predictor` per replica (``num_gpus``
                  per replica from the config). Requests from every ingress replica are
                  gathered by ``@serve.batch`` into one ``Predictor.run`` call: each image
                  brings its own questions, and the engine shares each image's prefill among
                  them. Batch sizes are recorded in the Serve metric
                  ``iqa_spider_model_batch_size`` (a histogram), a log line per batch and
                  ``stats()`` (served at ``GET /v1/stats``).
``IQAGrounding``  the segmenter (SAM or the offline superpixel one): points -> masks -> the
                  result contract's region entries (COCO RLE, area, bbox).
``IQAIngress``    the FastAPI app of :mod:`iqa_spider.serve.api`: parsing, limits, decoding,
                  then the model and grounding calls through their handles.

Between deployments only plain data travels (uint8 arrays, dicts of str/float/list).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from iqa_spider.environment import present_env
from iqa_spider.infer import results as R
from iqa_spider.infer.planning import Ask, Plan, plan_for
from iqa_spider.infer.text_to_point import Point
from iqa_spider.serve.api import API_TOKEN_ENV, BackendUnavailable, build_api
from iqa_spider.serve.config import ServeAppConfig, config_from_args, config_to_args

# The model's modules (predictor, segmenters, loading: torch and transformers) are imported in
# the model and grounding replicas' own methods, so the ingress, defined in this module too,
# never loads them.

log = logging.getLogger("ray.serve")

BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


@serve.deployment(name="IQAModel")
class IQAModel:
    def __init__(self, cfg: dict):
        from iqa_spider.infer.predictor import Predictor
        from iqa_spider.model.loading import load_model, public_model_uri
        from iqa_spider.model.processor import processor_max_pixels

        self.cfg: ServeAppConfig = config_from_args(cfg)
        t0 = time.perf_counter()
        loaded = load_model(self.cfg.model, self.cfg.infer.cache_dir)
        # Clients see names and versions, never the server's paths (model folder, cache).
        model_uri = public_model_uri(loaded.uri)
        self.predictor = Predictor(loaded.model, loaded.processor, self.cfg.infer, model_uri, loaded.version)
        self.info_ = {
            "model_uri": model_uri, "model_version": loaded.version,
            "max_pixels": processor_max_pixels(loaded.processor),
            "family": getattr(loaded.model.config, "model_type", None), "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""), "mapping": self.cfg.infer.mapping,
            "tau": self.cfg.infer.tau, "prefix_sharing": self.cfg.infer.prefix_sharing,
            "max_batch_size": self.cfg.deployments.model.max_batch_size,
            "batch_wait_timeout_s": self.cfg.deployments.model.batch_wait_timeout_s,
            "load_seconds": round(time.perf_counter() - t0, 2),
        }
        settings = self.cfg.deployments.model
        self._batched.set_max_batch_size(settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.requests = 0
        self.busy_s = 0.0
        try:
            from ray.serve.metrics import Counter, Histogram

            self.m_batch = Histogram("iqa_spider_model_batch_size", description="images per model batch",
                                     boundaries=BATCH_BOUNDARIES)
            self.m_images = Counter("iqa_spider_model_images", description="images answered by the model")
        except Exception:  # noqa: BLE001 - metrics are best effort (no metrics agent in some setups)
            self.m_batch = self.m_images = None
        log.info("IQAModel ready: %s version %s on %s (from %s)", loaded.uri, loaded.version, loaded.device,
                 loaded.local_dir)

    def model_info(self) -> dict:
        return dict(self.info_)

    def stats(self) -> dict:
        n = sum(self.batch_sizes.values())
        ctx = serve.get_replica_context()
        return {"replica": ctx.replica_id.unique_id if ctx else None, "requests": self.requests, "batches": n,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size_seen": max(self.batch_sizes) if self.batch_sizes else 0,
                "mean_batch_size": (self.requests / n) if n else 0.0, "busy_s": round(self.busy_s, 3)}

    def check_health(self) -> None:
        if self.predictor is None:
            raise RuntimeError("no predictor")

    async def analyze(self, image: np.ndarray, spec: dict) -> dict:
        """One image and its questions; answered together with whatever else is queued."""
        return await self._batched(image, spec)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _batched(self, images: list[np.ndarray], specs: list[dict]) -> list[dict]:
        n = len(images)
        self.batch_sizes[n] += 1
        self.requests += n
        if self.m_batch is not None:
            self.m_batch.observe(n)
            self.m_images.inc(n)
        t0 = time.perf_counter()
        out = await asyncio.to_thread(self._run, images, specs)
        dt_ = time.perf_counter() - t0
        self.busy_s += dt_
        log.info("model batch of %d image(s), %d question(s) in %.3fs", n,
                 sum(len(plan_for(self.cfg.infer, Ask.from_spec(s)).queries) for s in specs), dt_)
        return out

    def _run(self, arrays: list[np.ndarray], specs: list[dict]) -> list[dict]:
        from PIL import Image

        from iqa_spider.infer.predictor import isolate_failures

        images = [Image.fromarray(a) for a in arrays]
        plans = [plan_for(self.predictor.cfg, Ask.from_spec(s)) for s in specs]
        results = isolate_failures(lambda pairs: self.predictor.run([im for im, _ in pairs], [qs for _, qs in pairs]),
                                   [(im, plan.queries) for im, plan in zip(images, plans)])
        return [self._answer(im, spec, plan, res) for im, spec, plan, res in zip(images, specs, plans, results)]

    def _answer(self, image, spec: dict, plan: Plan, results) -> dict:
        """The answer the ingress and the scoring job read: the assembled analysis as plain data,
        groundings as points (the grounding deployment adds their masks)."""
        p = self.predictor
        # answers are in the image's own size; the ingress may have decoded it smaller
        width, height = spec.get("size") or (image.width, image.height)
        base = {"width": width, "height": height, "model_uri": p.model_uri,
                "model_version": None if p.model_version is None else str(p.model_version)}
        if isinstance(results, Exception):
            return {**base, "error": R.inference_error(results)}
        a = p.assemble(plan, results, width, height, spec.get("mapping"))
        score = a.score
        return {**base, "error": None, "description": a.description,
                "score": {"score": score.score, "level": score.level, "level_probs": score.level_probs},
                "referring": [dataclasses.asdict(t) for t in a.referring],
                "local_descriptions": [dataclasses.asdict(t) for t in a.local_descriptions],
                "groundings": [{"query": g.query, "answer": g.answer, "whole_image": g.whole_image,
                                "points": [[pt.x, pt.y, pt.p_right, pt.p_bottom] for pt in g.points]}
                               for g in a.regions]}


def _resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST)) > 0


@serve.deployment(name="IQAGrounding")
class IQAGrounding:
    def __init__(self, cfg: dict):
        from iqa_spider.infer.segmenters import build_segmenter

        self.cfg = config_from_args(cfg)
        self.segmenter = build_segmenter(self.cfg.segmenter)  # masks only: the model lives in IQAModel
        self.kind = self.cfg.segmenter.kind
        log.info("IQAGrounding ready: segmenter %s", self.kind)

    def info(self) -> dict:
        path = self.cfg.segmenter.path
        return {"kind": self.kind, "name": path.rstrip("/").rsplit("/", 1)[-1] if path else None}  # no server path

    async def segment(self, image: np.ndarray, groundings: list[dict], size=None) -> list[dict]:
        return await asyncio.to_thread(self._segment, image, groundings, size)

    def _segment(self, image: np.ndarray, groundings: list[dict], size=None) -> list[dict]:
        """Masks for the points of each grounding. ``size``: the image's own (width, height)
        when ``image`` was decoded smaller: points come and go in that size, and the masks
        are scaled up to it (nearest), so a row is the same whatever the decode size."""
        from PIL import Image

        from iqa_spider.infer.predictor import Grounding

        pil = Image.fromarray(image)
        width, height = size or pil.size
        sx, sy = pil.width / width, pil.height / height
        gs = []
        for g in groundings:
            points = [Point(float(x) * sx, float(y) * sy, float(pr), float(pb)) for x, y, pr, pb in g["points"]]
            gs.append(Grounding(g["query"], g["answer"], pil.width, pil.height, bool(g["whole_image"]), points=points))
        self.segmenter.attach_masks(pil, gs)
        if (width, height) != pil.size:
            for g in gs:
                g.points = [Point(p.x / sx, p.y / sy, p.p_right, p.p_bottom) for p in g.points]
                g.masks = [_resize_mask(m, width, height) for m in g.masks]
                g.mask = None if g.mask is None else _resize_mask(g.mask, width, height)
        return [e for g in gs for e in R.region_entries(g)]


@serve.deployment(name="IQAIngress")
@serve.ingress()
class IQAIngress:
    """FastAPI ingress; the app is built per replica from the config (``__serve_build_asgi_app__``)."""

    def __init__(self, model: DeploymentHandle, grounding: DeploymentHandle, cfg: dict):
        self.cfg = config_from_args(cfg)
        self.model, self.grounding = model, grounding
        self._segmenter: dict | None = None

    def __serve_build_asgi_app__(self):
        # the replica's own environment (the node's, or the pod's secret), never the Serve config
        return build_api(self, self.cfg.limits, os.environ.get(API_TOKEN_ENV) or None)

    # the api.Backend protocol -------------------------------------------------

    async def _call(self, response, what: str):
        from ray.serve.exceptions import BackPressureError

        try:
            return await response
        except BackPressureError as exc:
            raise BackendUnavailable(429, "overloaded", f"the {what} deployment is at capacity: {exc}") from None
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as exc:
            log.exception("%s call failed", what)  # the whole story here; the client gets the kind only
            raise BackendUnavailable(503, f"{what}_unavailable",
                                     f"the {what} deployment did not answer ({type(exc).__name__})") from None

    async def analyze(self, image: np.ndarray, spec: dict) -> dict:
        return await self._call(self.model.analyze.remote(image, spec), "model")

    async def segment(self, image: np.ndarray, groundings: list[dict], size=None) -> list[dict]:
        return await self._call(self.grounding.segment.remote(image, groundings, size), "grounding")

    async def model_info(self) -> dict:
        info = await self._call(self.model.model_info.remote(), "model")
        if self._segmenter is None:
            self._segmenter = await self._call(self.grounding.info.remote(), "grounding")
        return {**info, "segmenter": self._segmenter}

    async def stats(self) -> dict:
        return await self._call(self.model.stats.remote(), "model")


def _options(settings, env: dict[str, str], extra: dict | None = None) -> dict:
    """Deployment options from one deployments.<name> section."""
    actor: dict[str, Any] = {"num_cpus": settings.num_cpus}
    if getattr(settings, "num_gpus", 0):
        actor["num_gpus"] = settings.num_gpus
    if env:
        actor["runtime_env"] = {"env_vars": dict(env)}
    opts: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": settings.max_ongoing_requests}
    if getattr(settings, "max_queued_requests", None) is not None:
        opts["max_queued_requests"] = settings.max_queued_requests
    if settings.autoscaling.enabled:
        opts["autoscaling_config"] = settings.autoscaling.as_serve()
    else:
        opts["num_replicas"] = settings.num_replicas
    opts.update(extra or {})
    return opts


def build_application(cfg: ServeAppConfig):
    """The bound application: ingress -> (model, grounding)."""
    env = present_env(cfg.forward_env)
    args = config_to_args(cfg)
    d = cfg.deployments
    model = IQAModel.options(**_options(d.model, env)).bind(args)
    grounding = IQAGrounding.options(**_options(d.grounding, env)).bind(args)
    return IQAIngress.options(**_options(d.ingress, env)).bind(model, grounding, args)


__all__ = ["IQAModel", "IQAGrounding", "IQAIngress", "build_application"]
