"""The batch scoring job: an image collection (local or S3) -> result-contract Parquet.

Straight path: list the inputs (streamed) -> drop keys the output already holds -> cut the
rest into blocks -> Ray Data: read + decode (CPU tasks) -> score (actor pool, or a running
Serve app) -> write one shard per block under a name derived from its keys -> summary.

Exactly once: every input key gets one row (scored, or ``error`` set). A block is written
whole or not at all (atomic write) under its own name, so a retried block (a scoring actor
that died, a lost worker) replaces its shard; a re-run skips every key already written.
"""
from __future__ import annotations

import json
import logging
import os
import time

from iqa_spider import storage
from iqa_spider.config import ConfigError
from iqa_spider.entrypoint import run_job
from iqa_spider.environment import WORKER_ENV, present_env
from iqa_spider.model import loading
from iqa_spider.score import report, stages
from iqa_spider.score.config import CRASH_ENV, ScoreConfig
from iqa_spider.score.listing import Listing, iter_inputs, load_index, plan_blocks, release_errors

log = logging.getLogger(__name__)

# Passed to every stage explicitly: workers of a cluster do not inherit the driver's environment.
FORWARD_ENV = WORKER_ENV


def resolve_model(cfg: ScoreConfig) -> tuple[str, str | None]:
    """Pin ``models:/name@alias`` to one version on the driver, so every actor loads (and
    every row reports) the same version even if the alias moves during the job."""

    configured = cfg.model.path
    if not loading.is_mlflow_uri(configured):
        return configured, None
    try:  # through the module, so a test can stand in for the registry
        version, _, pinned = loading.resolve_mlflow_version(configured, cfg.model.tracking_uri)
    except Exception as exc:  # noqa: BLE001 - no registry, no such model or alias: a config problem
        raise ConfigError(f"cannot resolve {configured}: {exc}", key="model.path") from None
    cfg.model.path = pinned
    log.info("model %s is version %s (%s)", configured, version, pinned)
    return configured, version


def check_serve(cfg: ScoreConfig) -> None:
    """backend serve needs the Serve application running on this cluster."""
    try:
        from ray import serve

        status = serve.status()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"backend serve is not available: {type(exc).__name__}: {exc}", key="backend") from None
    app = status.applications.get(cfg.serve.app_name)
    if app is None or str(getattr(app.status, "value", app.status)) != "RUNNING":
        raise ConfigError(f"backend serve: no RUNNING Serve application {cfg.serve.app_name!r} on this cluster "
                          f"(found {sorted(status.applications) or 'none'}); start it with "
                          "`serve deploy serving/config.yaml`, or use backend=actors", key="backend")


def check_resources(cfg: ScoreConfig) -> None:
    """Warn when the actor pool leaves no CPU for the decode and write tasks: the job would
    wait until the cluster grows (an autoscaling cluster may; a fixed one never will)."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    sc = cfg.scoring
    n = sc.actors if cfg.backend == "actors" else cfg.serve.clients
    need = (sc.num_cpus if cfg.backend == "actors" else 0.1) * n + sc.decode_cpus + sc.write_cpus
    if need > total + 1e-9:
        log.warning("the cluster has %g CPUs now but %d scoring actors + a decode task (%g CPU) + a writer (%g CPU) "
                    "need %g: the job waits until the cluster grows; lower scoring.num_cpus or scoring.actors",
                    total, n, sc.decode_cpus, sc.write_cpus, need)


def build_dataset(cfg: ScoreConfig, blocks: list[dict], model_uri: str, model_version: str | None, env: dict):
    import ray

    crash = os.environ.get(CRASH_ENV) or None  # read here, passed to the actors explicitly
    ds = ray.data.from_items([stages.pack_block(b) for b in blocks], override_num_blocks=len(blocks))
    # decode_memory_mb also keeps Ray Data from fusing the decode tasks into the scoring
    # actors (it fuses maps whose resources are equal), so decoding never blocks a model.
    ds = ds.map(stages.read_decode, num_cpus=cfg.scoring.decode_cpus,
                memory=cfg.scoring.decode_memory_mb * 2**20,
                fn_kwargs={"max_pixels": cfg.infer.max_pixels, "attempts": cfg.input.read_retries,
                           "backoff_s": cfg.input.retry_backoff_s, "env": env, "crash_marker": crash})
    common = {"describe": cfg.describe, "ground_questions": cfg.ground_questions, "crash_marker": crash, "env": env}
    # Ray Data restarts a dead pool actor and resubmits its block (max_restarts / max_task_retries
    # -1 for actor pools); the block's rows are only written by the next stage, so a retry
    # never duplicates.
    if cfg.backend == "actors":
        ds = ds.map(stages.Scorer, compute=ray.data.ActorPoolStrategy(size=cfg.scoring.actors),
                    num_cpus=cfg.scoring.num_cpus, num_gpus=cfg.scoring.num_gpus or None,
                    fn_constructor_kwargs={"model_cfg": cfg.model, "infer_cfg": cfg.infer, "seg_cfg": cfg.segmenter,
                                           "model_uri": model_uri, "model_version": model_version, **common})
    else:
        s = cfg.serve
        ds = ds.map(stages.ServeScorer, compute=ray.data.ActorPoolStrategy(size=s.clients), num_cpus=0.1,
                    fn_constructor_kwargs={"app_name": s.app_name, "model_deployment": s.model_deployment,
                                           "grounding_deployment": s.grounding_deployment,
                                           "timeout_s": s.timeout_s, **common})
    return ds.map(stages.write_block, num_cpus=cfg.scoring.write_cpus,
                  fn_kwargs={"input_uri": cfg.input.uri, "output_uri": cfg.output.uri, "masks": cfg.output.masks,
                             "overlays": cfg.output.overlays, "env": env})


def run_score(cfg: ScoreConfig) -> dict:
    """Run the job; returns the run summary (also written to OUTPUT/_summary.json)."""
    started = time.monotonic()
    storage.require_input(cfg.input.uri, "input.uri")
    if cfg.backend == "actors":
        model_uri, model_version = resolve_model(cfg)
    else:
        model_uri, model_version = cfg.model.path, None
    listing = Listing()
    released = release_errors(cfg.output.uri, cfg.input.retry_errors)
    if released:
        log.info("score: %d rows with errors %s taken out of the output to score again", released,
                 cfg.input.retry_errors)
    index = load_index(cfg.output.uri)
    blocks, skipped = plan_blocks(iter_inputs(cfg.input.uri, cfg.output.uri, cfg.input.sniff_unknown, listing),
                                  index.keys, cfg.output.block_size, cfg.output.uri)
    for b in blocks:
        b["keep_images"] = cfg.output.overlays
    pending = sum(len(b["keys"]) for b in blocks)
    log.info("score: %d inputs listed in %.1fs (%d other files ignored); %d already in the output, skipped; "
             "%d to score in %d blocks", pending + skipped, listing.seconds, listing.ignored, skipped, pending,
             len(blocks))
    new: list[dict] = []
    if blocks:
        from iqa_spider.raycluster import ensure_ray

        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
        if cfg.backend == "serve":
            check_serve(cfg)
        check_resources(cfg)
        env = present_env(FORWARD_ENV)
        t_run, done_keys, written_at, restarts = time.monotonic(), 0, [], set()
        for row in build_dataset(cfg, blocks, model_uri, model_version, env).iter_rows():
            s = json.loads(row["summary"])
            new.append(s)
            restarted = report.restarted_actors([s]) - restarts
            if restarted:  # said in the job's own log, not only Ray's
                restarts |= restarted
                log.warning("score: a scoring actor was restarted after its process died, and its block retried "
                            "(%d restart(s) so far; no row is lost or doubled)", len(restarts))
            retried = {stage: n for stage, n in (s.get("task_retries") or {}).items() if n}
            if retried:
                log.warning("score: block %s was retried in %s after a worker died under it (no row is lost or "
                            "doubled)", s["shard"], ", ".join(f"{st} ({n}x)" for st, n in retried.items()))
            done_keys += s["keys"]
            written_at.append(time.monotonic())
            elapsed = written_at[-1] - t_run
            log.info("block %d/%d written: %s (%d scored, errors %s); %d/%d images, %.2f images/s",
                     len(new), len(blocks), s["shard"], s["scored"], s["errors"] or "none", done_keys, pending,
                     done_keys / max(elapsed, 1e-9))
    seconds = {"total": round(time.monotonic() - started, 2), "listing": round(listing.seconds, 2)}
    if new:
        # pipeline: from the start of the Ray Data run (actor start-up and model load included);
        # steady: between the first and the last block written (start-up excluded)
        seconds["pipeline"] = round(written_at[-1] - t_run, 3)
        seconds["images_per_s"] = round(pending / max(written_at[-1] - t_run, 1e-9), 3)
        if len(new) > 1:
            seconds["steady_images_per_s"] = round(sum(s["keys"] for s in new[1:]) /
                                                   max(written_at[-1] - written_at[0], 1e-9), 3)
    if model_version is None and new:  # backend serve: the version the deployment reported on the rows
        model_version = next((s["model_version"] for s in new if s.get("model_version")), None)
    summary = report.run_summary(new, index.keys, index.scores, skipped=skipped, listed=pending + skipped,
                                 ignored=listing.ignored, seconds=seconds, backend=cfg.backend,
                                 model_uri=model_uri, model_version=model_version)
    if cfg.output.summary:
        storage.write_bytes(storage.join(cfg.output.uri, "_summary.json"), report.dumps(summary))
        if summary["rows"]:
            report.write_histogram_png(summary, storage.join(cfg.output.uri, "_histogram.png"))
            if cfg.output.html:
                from iqa_spider.score import html

                summary["report"] = html.write(cfg.output.uri, cfg.input.uri, summary)
    log.info("score summary: %s", json.dumps({k: v for k, v in summary.items() if k != "score_histogram"}))
    return summary


def main(argv=None) -> int:
    return run_job(ScoreConfig, run_score, argv, description="score: image collection -> result-contract Parquet")


__all__ = ["run_score", "main", "resolve_model", "FORWARD_ENV"]
