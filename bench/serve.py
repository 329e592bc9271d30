"""Online serving: requests/s and latency through Ray Serve vs calling the predictor directly.

**direct**: the grounding head in this process (``Predictor.analyze`` + segmenter masks), one
call per batch of ``c`` images, nothing between the caller and the model: the ceiling.
``c = 1`` is a plain loop over images; ``c > 1`` is what a caller that already holds ``c``
images at once gets.

**served**: the application of ``serving/config.yaml``'s schema on a local Ray (``serve.run``,
HTTP on 127.0.0.1), ``c`` concurrent clients each posting one image per request (multipart)
and waiting for the answer: JSON parsing, limits, decoding, the model deployment's
``@serve.batch`` gathering concurrent requests, the grounding deployment, the JSON row.
The model deployment's batch sizes are read from ``GET /v1/stats``.

Both answer the same question set per image (``--task``: ``score`` = Q-Align score only;
``ground`` = score + the HyD-G question with point and mask).

    .venv/bin/python bench/serve.py                              # tiny random Qwen2.5-VL, CPU
    .venv/bin/python bench/serve.py --task ground --levels 1,8,32 --requests 96
    .venv/bin/python bench/serve.py --model models:/iqa-spider@champion --device cuda --num-gpus 1

The markdown section is printed and written to ``--md`` (default /tmp/bench_serve.md).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: F401 - first: it sets the benchmarks' environment


def make_images(n: int, side: int, seed: int = 0):
    from infer import make_images as crops  # bench/infer.py: crops of scikit-image's bundled photos

    return crops(n, side, seed)


def encode(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[k]


def bench_direct(head, images, levels, questions, rounds: int) -> dict[int, dict]:
    out = {}
    for c in levels:
        head.analyze(images[:c], describe=False, ground_questions=questions)  # warm-up at this batch size
        lat, n_done, t0 = [], 0, time.perf_counter()
        for _ in range(rounds):
            for s in range(0, len(images), c):
                batch = images[s:s + c]
                t = time.perf_counter()
                head.analyze(batch, describe=False, ground_questions=questions)
                lat.extend([time.perf_counter() - t] * len(batch))  # each image waits for its batch
                n_done += len(batch)
        wall = time.perf_counter() - t0
        out[c] = {"rps": n_done / wall, "p50": pct(lat, 50), "p99": pct(lat, 99), "n": n_done}
        print(f"direct  c={c:3d}: {out[c]['rps']:7.2f} img/s  p50 {out[c]['p50'] * 1e3:7.1f} ms  "
              f"p99 {out[c]['p99'] * 1e3:7.1f} ms", flush=True)
    return out


def bench_served(url: str, payloads: list[bytes], levels, n_requests: int, fields: dict) -> dict[int, dict]:
    import requests

    local = threading.local()

    def session():
        if not hasattr(local, "s"):
            local.s = requests.Session()
        return local.s

    def one(i: int) -> float:
        t = time.perf_counter()
        r = session().post(url + "/v1/assess", files={"image": ("i.jpg", payloads[i % len(payloads)], "image/jpeg")},
                           data=fields, timeout=300)
        if r.status_code != 200 or r.json().get("error"):
            raise RuntimeError(f"request {i}: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - t

    with cf.ThreadPoolExecutor(max(levels)) as pool:
        list(pool.map(one, range(min(8, n_requests))))  # warm-up (connections, first batches)
        out = {}
        for c in levels:
            before = requests.get(url + "/v1/stats", timeout=30).json()
            sem = threading.Semaphore(c)

            def gated(i: int, sem: threading.Semaphore = sem) -> float:
                with sem:
                    return one(i)

            t0 = time.perf_counter()
            lat = list(pool.map(gated, range(n_requests)))
            wall = time.perf_counter() - t0
            after = requests.get(url + "/v1/stats", timeout=30).json()
            batches = after["batches"] - before["batches"]
            reqs = after["requests"] - before["requests"]
            out[c] = {"rps": n_requests / wall, "p50": pct(lat, 50), "p99": pct(lat, 99), "n": n_requests,
                      "mean_batch": reqs / batches if batches else 0.0,
                      "max_batch": max((int(k) for k, v in after["batch_sizes"].items()
                                        if v > before["batch_sizes"].get(k, 0)), default=0)}
            print(f"served  c={c:3d}: {out[c]['rps']:7.2f} req/s  p50 {out[c]['p50'] * 1e3:7.1f} ms  "
                  f"p99 {out[c]['p99'] * 1e3:7.1f} ms  mean batch {out[c]['mean_batch']:.1f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model path or URI (default: a fresh tiny random Qwen2.5-VL)")
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    ap.add_argument("--task", choices=("score", "ground"), default="score")
    ap.add_argument("--levels", default="1,4,16,32", help="client concurrency levels")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--side", type=int, default=224, help="image size (crops of about side x side)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=20.0)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the direct path (= CPUs of the model replica, which Ray gives "
                         "OMP_NUM_THREADS=1)")
    ap.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    from common import record
    from iqa_spider.config.schemas import ModelConfig
    from iqa_spider.infer.config import HYD_QUESTION, InferConfig, SegmenterConfig
    from iqa_spider.infer.predictor import GroundingHead

    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    model_path = args.model
    if model_path is None:
        from iqa_spider.model.tiny import init_tiny

        model_path = str(init_tiny(args.family, Path(tmp) / "tiny", seed=0))
    questions = [HYD_QUESTION] if args.task == "ground" else []
    infer = {"max_new_tokens": args.max_new_tokens, "batch_size": args.max_batch_size,
             "max_rows": max(32, 2 * args.max_batch_size)}
    images = make_images(args.requests, args.side, seed=1)
    payloads = [encode(im) for im in images]
    from PIL import Image

    decoded = [Image.open(io.BytesIO(p)).convert("RGB") for p in payloads]  # what the service sees

    # ---- direct
    import torch

    torch.set_num_threads(args.threads)
    head = GroundingHead.from_config(ModelConfig(family=args.family, path=model_path, device=args.device),
                                     InferConfig(**infer), SegmenterConfig())
    direct = bench_direct(head, decoded, levels, questions, rounds=2)
    del head

    # ---- served
    import ray
    from ray import serve

    from iqa_spider.serve.app import build_app

    with socket.socket() as probe:  # a free port for Serve's HTTP proxy
        probe.bind(("127.0.0.1", 0))
        port_no = probe.getsockname()[1]
    ray.init(num_cpus=max(args.num_cpus, args.threads + 1), include_dashboard=False, configure_logging=True,
             logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port_no})
        app_args = {
            "model": {"family": args.family, "path": model_path, "device": args.device},
            "infer": infer,
            "deployments": {"model": {"num_cpus": args.threads, "num_gpus": args.num_gpus,
                                      "max_batch_size": args.max_batch_size,
                                      "batch_wait_timeout_s": args.batch_wait_ms / 1000,
                                      "max_ongoing_requests": max(64, 2 * args.max_batch_size)},
                            "grounding": {"num_cpus": 0.25}, "ingress": {"num_cpus": 0.25}},
        }
        serve.run(build_app(app_args), name="bench", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port_no}"
        import requests

        deadline = time.monotonic() + 300
        while True:
            try:
                if requests.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not become healthy in 300 s")
            time.sleep(0.5)
        fields = {"ground": "true"} if args.task == "ground" else {}
        served = bench_served(url, payloads, levels, args.requests, fields)
    finally:
        serve.shutdown()
        ray.shutdown()

    task = "score" if args.task == "score" else "score + HyD-G grounding (point + superpixel mask)"
    rows = ["| concurrency | direct (images/s) | direct p50 / p99 (ms) | served (requests/s) | served p50 / p99 (ms) "
            "| mean / max model batch | served / direct |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in levels:
        d, s = direct[c], served[c]
        rows.append(f"| {c} | {d['rps']:.1f} | {d['p50'] * 1e3:.0f} / {d['p99'] * 1e3:.0f} | {s['rps']:.1f} | "
                    f"{s['p50'] * 1e3:.0f} / {s['p99'] * 1e3:.0f} | {s['mean_batch']:.1f} / {s['max_batch']} | "
                    f"{s['rps'] / d['rps']:.2f}x |")
    model_desc = "tiny random " + args.family if args.model is None else args.model
    md = (f"## Online serving: Ray Serve vs the predictor called directly (bench/serve.py)\n\n"
          f"Task per image: {task}. Model: {model_desc} on {args.device}; {args.requests} JPEG crops of about "
          f"{args.side} px per level. **Direct**: `GroundingHead.analyze` in-process on batches of c images (c = "
          f"concurrency; latency = the batch's time). **Served**: c concurrent HTTP clients, one multipart image "
          f"per request, through the ingress (parse, limits, decode), the model deployment (`@serve.batch`, "
          f"max {args.max_batch_size}, wait {args.batch_wait_ms:g} ms) and the grounding deployment; model batch "
          f"sizes from `GET /v1/stats`. Local Ray with {args.num_cpus} CPUs, clients in the same machine; torch "
          f"threads {args.threads} on both paths (the model replica has num_cpus {args.threads}).\n\n"
          + "\n".join(rows) + "\n")
    print("\n" + md)
    if args.record:
        record(f"Online serving ({task}): Ray Serve vs the predictor called directly", md.split("\n\n", 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
