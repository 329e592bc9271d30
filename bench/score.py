"""Batch scoring: end-to-end images/s of the job against the predictor alone on the same images.

**predictor alone**: ``GroundingHead.predict_rows`` in this process on the encoded images
(decode, model, segmenter, result rows), in chunks of ``infer.batch_size``, after a warm-up:
the ceiling for one model.

**job**: ``run_score`` over the same images written to a folder: listing, Ray Data read +
decode tasks, the actor pool (1, then 2 actors), the Parquet writers. Two rates per run:
``pipeline`` (from the start of the Ray Data run: actor start-up and model load included) and
``steady`` (between the first and the last block written). The overhead ratio is
job steady images/s / predictor-alone images/s with the same number of models (goal >= 0.9).

**serve** (``--serve``): the same job with ``backend=serve`` against the Serve application of
``serving/config.yaml``'s schema started on the same local Ray (one model replica).

    .venv/bin/python bench/score.py                        # tiny random Qwen2.5-VL, CPU, 64 images
    .venv/bin/python bench/score.py --images 256 --side 448 --task ground --serve
    .venv/bin/python bench/score.py --model models:/iqa-spider@champion --num-gpus 1

The markdown section is printed and written to ``--md`` (default /tmp/bench_score.md).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from common import REPO  # first: it sets the benchmarks' environment


def encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def job_cfg(args, model: str, inp: str, out: str, *extra: str):
    from iqa_spider.config import load_config
    from iqa_spider.score.config import ScoreConfig

    tasks = "[score]" if args.task == "score" else "[score,ground]"
    return load_config(ScoreConfig, REPO / "configs/score.yaml", [
        f"model.path={model}", f"input.uri={inp}", f"output.uri={out}", f"tasks={tasks}",
        f"infer.max_new_tokens={args.max_new_tokens}", f"infer.batch_size={args.batch_size}",
        f"output.block_size={args.block_size}", f"scoring.num_gpus={args.num_gpus}",
        f"scoring.num_cpus={args.actor_cpus}", "scoring.decode_cpus=0.25", "scoring.write_cpus=0.1", *extra])


def predictor_alone(args, model: str, items: list[tuple[str, bytes]]) -> tuple[float, float]:
    """(images/s, load seconds) of predict_rows in this process."""
    import torch

    from iqa_spider.config.schemas import ModelConfig
    from iqa_spider.infer.config import InferConfig
    from iqa_spider.infer.predictor import GroundingHead

    torch.set_num_threads(max(1, int(args.actor_cpus)))  # what one actor gets (OMP_NUM_THREADS = its CPUs)
    t0 = time.perf_counter()
    head = GroundingHead.from_config(ModelConfig(path=model), InferConfig(batch_size=args.batch_size,
                                                                          max_new_tokens=args.max_new_tokens))
    load_s = time.perf_counter() - t0
    gq = [] if args.task == "score" else None
    head.predict_rows(items[: args.batch_size], describe=False, ground_questions=gq)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(items), args.block_size):
        rows = head.predict_rows(items[i:i + args.block_size], describe=False, ground_questions=gq)
        assert all(r["error"] is None for r in rows)
    return len(items) / (time.perf_counter() - t0), load_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: a fresh tiny random Qwen2.5-VL)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--task", choices=("score", "ground"), default="ground")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--actor-cpus", type=float, default=1.0)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--serve", action="store_true", help="also run backend=serve against a local Serve app")
    ap.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = ap.parse_args()

    import ray

    from common import record
    from infer import make_images  # bench/infer.py: crops of scikit-image's bundled photos
    from iqa_spider import storage
    from iqa_spider.score.job import run_score

    work = Path(tempfile.mkdtemp(prefix="bench_score_"))
    model = args.model
    if model is None:
        from iqa_spider.model.tiny import init_tiny

        model = str(init_tiny("qwen2_5_vl", work / "tiny", seed=0))
    images = make_images(args.images, args.side)
    items = []
    for i, img in enumerate(images):
        data = encode(img)
        uri = str(work / "images" / f"{i:05d}.jpg")
        storage.write_bytes(uri, data)
        items.append((uri, data))

    alone, load_s = predictor_alone(args, model, items)
    print(f"predictor alone: {alone:.2f} images/s (model load {load_s:.1f}s)", flush=True)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    try:
        cpus = ray.cluster_resources()["CPU"]
        for n in (1, 2):
            # leave 0.35 CPU to the decode and write tasks
            per_actor = min(args.actor_cpus, (cpus - 0.35) / n) if not args.num_gpus else args.actor_cpus
            s = run_score(job_cfg(args, model, str(work / "images"), str(work / f"out_actors{n}"),
                                  f"scoring.actors={n}", f"scoring.num_cpus={per_actor:.3f}"))
            assert s["rows"] == s["scored"] == len(items), s
            results.append((f"actors={n}", n, s))
            print(f"job, {n} actor(s): {s['seconds']}", flush=True)
        if args.serve:
            import socket

            from ray import serve

            from iqa_spider.serve.app import build_app

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                serve.run(build_app({
                    "model": {"path": model},
                    "infer": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens},
                    "deployments": {"model": {"num_cpus": args.actor_cpus, "num_gpus": args.num_gpus,
                                              "max_batch_size": args.batch_size},
                                    "grounding": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.1}},
                    "forward_env": ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"]}), name="iqa-spider",
                    route_prefix="/", blocking=False)
                s = run_score(job_cfg(args, model, str(work / "images"), str(work / "out_serve"), "backend=serve",
                                      "serve.clients=2"))
                assert s["rows"] == s["scored"] == len(items), s
                results.append(("serve (1 replica)", 1, s))
                print(f"job, serve backend: {s['seconds']}", flush=True)
            finally:
                serve.shutdown()
    finally:
        ray.shutdown()

    lines = ["| run | models | end-to-end images/s (incl. start-up) | steady images/s | vs predictor alone x models "
             "(steady) | slowest stage | stage seconds (read/decode/score/write) |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |",
             f"| predictor alone (`predict_rows`, in process) | 1 | - | {alone:.2f} | 1.00 | - | - |"]
    for name, n, s in results:
        sec, st = s["seconds"], s["this_run"]["stage_seconds"]
        steady = sec.get("steady_images_per_s", float("nan"))
        lines.append(f"| job, {name} | {n} | {sec['images_per_s']:.2f} | {steady:.2f} | {steady / (alone * n):.2f} | "
                     f"{s['this_run']['slowest_stage']} | {st['read']:.2f}/{st['decode']:.2f}/{st['score']:.2f}/"
                     f"{st['write']:.2f} |")
    body = (f"{args.images} JPEG images of about {args.side} px, task `{args.task}` "
            f"(max {args.max_new_tokens} new tokens), infer.batch_size {args.batch_size}, blocks of "
            f"{args.block_size}, {args.actor_cpus:g} CPU(s) and {args.num_gpus:g} GPU(s) per model; model "
            f"{'tiny random Qwen2.5-VL' if args.model is None else args.model}; local folder input.\n\n"
            + "\n".join(lines) + "\n")
    print(body)
    if args.record:
        record("Batch scoring: the job against the predictor alone", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
