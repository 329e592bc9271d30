"""Annotation throughput: images per second per core at 512 px, and how it scales on Ray.

Three measurements on scikit-image's bundled photos (nothing is downloaded), each source
photo shrunk to 512 px on its longer side and written under several names so there is
enough work (each name is a different source: its own seed, regions and distortions):

1. `ShardAnnotator.annotate_source` in this one process, with numeric libraries held to
   one thread: the per-core cost of the annotation work itself (decode, regions,
   distortions, PNG encode and write, task writers).
2. The whole job, `run_annotate`, on a local Ray with 1 CPU, then 2 CPUs, each into a
   fresh output folder (Ray is started before the clock starts; Ray Data's start-up,
   actor start-up, listing and the summary are inside it).

The scaling figure is the 2-CPU throughput over the 1-CPU throughput (2.0 would be
perfect). A dated section with the command, machine, versions and figures is appended
to BENCHMARKS.md unless --no-record is given. "images" are source images, as in the
earlier records; "distorted/s" counts the distorted images made (sources x views x
variants), the figure to compare runs with other `--views` / `--variants`.

    .venv/bin/python bench/annotate.py                 # about 2-3 minutes on 2 cores
    .venv/bin/python bench/annotate.py --images 8 --no-record
    .venv/bin/python bench/annotate.py --images 8 --views 16 --variants 8 --side 224 --shard-size 1
"""
from __future__ import annotations

import os

# One thread per process for the numeric libraries, before any of them is imported: the
# single-process figure is then a per-core figure, and Ray workers do not oversubscribe.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from common import REPO, machine, record  # noqa: E402

SIDE = 512  # the default --side


def write_inputs(folder: Path, n: int, side: int = SIDE) -> list[Path]:
    """n PNG files at `side` px: the bundled photos, repeated under new names as needed."""
    from PIL import Image

    from iqa_spider.annotate.pipeline import iter_builtin_photos
    from iqa_spider.images import encode_png, resize_max_side

    photos = []
    for name, img in iter_builtin_photos():
        pil = Image.fromarray(img)
        if max(pil.size) < side:  # a few bundled photos are smaller: bring them up to `side`
            scale = side / max(pil.size)
            pil = pil.resize((round(pil.width * scale), round(pil.height * scale)), Image.Resampling.BICUBIC)
        photos.append((name, encode_png(resize_max_side(pil, side))))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        name, png = photos[i % len(photos)]
        path = folder / f"{i:03d}-{name}.png"
        path.write_bytes(png)
        paths.append(path)
    return paths


# Content settings of the run (--side, --views, --variants), set once by main().
SETTINGS = {"side": SIDE, "views": 1, "variants": None}


def make_config(inp: str, out: str, shard_size: int, num_cpus: int | None = None):
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig

    overrides = [f"input.uri={inp}", f"output.uri={out}", f"distort.max_side={SETTINGS['side']}",
                 f"output.shard_size={shard_size}", f"distort.views_per_image={SETTINGS['views']}"]
    if SETTINGS["variants"]:
        overrides.append(f"distort.variants_per_image={SETTINGS['variants']}")
    if num_cpus:
        overrides.append(f"ray.num_cpus={num_cpus}")
    return load_config(AnnotateConfig, REPO / "configs/annotate.yaml", overrides)


def bench_single(paths: list[Path], out: Path) -> dict:
    from iqa_spider.annotate.pipeline import ShardAnnotator

    cfg = make_config(str(paths[0].parent), str(out), shard_size=len(paths))
    annotator = ShardAnnotator(cfg)
    counts: Counter = Counter()
    # one warm-up image (imports, first-call caches), not timed
    annotator.annotate_source(str(paths[0]), paths[0].read_bytes(), None, counts)
    samples = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    for p in paths:
        samples += len(annotator.annotate_source(str(p), p.read_bytes(), None, counts))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    distorted = len(paths) * per_source(cfg)
    return {"images": len(paths), "samples": samples, "seconds": wall, "cpu_seconds": cpu,
            "img_per_s": len(paths) / wall, "img_per_cpu_s": len(paths) / cpu,
            "distorted_per_s": distorted / wall, "distorted_per_cpu_s": distorted / cpu}


def per_source(cfg) -> int:
    """Distorted images made per source (views x variants)."""
    return cfg.distort.views_per_image * cfg.distort.variants_per_image


def bench_ray(paths: list[Path], out: Path, num_cpus: int, shard_size: int) -> dict:
    import ray

    from iqa_spider.annotate.pipeline import run_annotate

    cfg = make_config(str(paths[0].parent), str(out), shard_size=shard_size, num_cpus=num_cpus)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # keep the output to the figures
    try:
        t0 = time.perf_counter()
        summary = run_annotate(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert summary["annotated"] == len(paths), summary
    return {"cpus": num_cpus, "images": summary["annotated"], "samples": summary["samples"],
            "seconds": wall, "img_per_s": summary["annotated"] / wall,
            "img_per_s_per_cpu": summary["annotated"] / wall / num_cpus,
            "distorted_per_s": summary["annotated"] * per_source(cfg) / wall}


def figures(single: dict, rays: list[dict], scaling: float | None) -> str:
    lines = [
        "| measurement | images | samples | seconds | images/s | images/s per core | distorted/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| `annotate_source`, 1 process, 1 thread | {single['images']} | {single['samples']} | "
        f"{single['seconds']:.1f} | {single['img_per_s']:.2f} | {single['img_per_cpu_s']:.2f} (by CPU time) | "
        f"{single['distorted_per_s']:.1f} |",
    ]
    for r in rays:
        lines.append(f"| `run_annotate`, local Ray, {r['cpus']} CPU | {r['images']} | {r['samples']} | "
                     f"{r['seconds']:.1f} | {r['img_per_s']:.2f} | {r['img_per_s_per_cpu']:.2f} | "
                     f"{r['distorted_per_s']:.1f} |")
    if scaling is not None:
        lines += ["", f"Scaling, 2-CPU over 1-CPU throughput of the whole job: **{scaling:.2f}x** (2.00 is perfect)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="source images per measurement (default 32)")
    ap.add_argument("--shard-size", type=int, default=4, help="images per shard in the Ray runs (default 4)")
    ap.add_argument("--cpus", default="1,2", help="Ray CPU counts to run the whole job with (default 1,2)")
    ap.add_argument("--side", type=int, default=SIDE, help=f"distort.max_side and the inputs' size (default {SIDE})")
    ap.add_argument("--views", type=int, default=1, help="distort.views_per_image (default 1)")
    ap.add_argument("--variants", type=int, default=None, help="distort.variants_per_image (default: the config's)")
    ap.add_argument("--no-record", action="store_true", help="print only")
    args = ap.parse_args(argv)
    SETTINGS.update(side=args.side, views=args.views, variants=args.variants)

    import logging

    logging.basicConfig(level=logging.WARNING)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {machine()}\nload average: {load}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as tmp:
        root = Path(tmp)
        paths = write_inputs(root / "in", args.images, args.side)
        single = bench_single(paths, root / "single")
        print(f"annotate_source, 1 process: {single['images']} images in {single['seconds']:.1f} s "
              f"-> {single['img_per_s']:.2f} images/s ({single['img_per_cpu_s']:.2f} per CPU-second), "
              f"{single['distorted_per_s']:.1f} distorted images/s", flush=True)
        rays = []
        for k in (int(c) for c in args.cpus.split(",") if c.strip()):
            r = bench_ray(paths, root / f"ray{k}", k, args.shard_size)
            rays.append(r)
            print(f"run_annotate, Ray {k} CPU: {r['images']} images in {r['seconds']:.1f} s "
                  f"-> {r['img_per_s']:.2f} images/s ({r['img_per_s_per_cpu']:.2f} per CPU), "
                  f"{r['distorted_per_s']:.1f} distorted images/s", flush=True)
    by = {r["cpus"]: r["img_per_s"] for r in rays}
    scaling = by[2] / by[1] if 1 in by and 2 in by else None

    print()
    print(f"{'measurement':<34} {'images':>6} {'seconds':>8} {'img/s':>7} {'img/s/core':>10} {'distorted/s':>11}")
    print(f"{'annotate_source, 1 process':<34} {single['images']:>6} {single['seconds']:>8.1f} "
          f"{single['img_per_s']:>7.2f} {single['img_per_cpu_s']:>10.2f} {single['distorted_per_s']:>11.1f}")
    for r in rays:
        print(f"{'run_annotate, Ray ' + str(r['cpus']) + ' CPU':<34} {r['images']:>6} {r['seconds']:>8.1f} "
              f"{r['img_per_s']:>7.2f} {r['img_per_s_per_cpu']:>10.2f} {r['distorted_per_s']:>11.1f}")
    if scaling is not None:
        print(f"scaling (2 CPU / 1 CPU throughput): {scaling:.2f}x")
    if not args.no_record:
        views = f", {args.views} views" if args.views > 1 else ""
        variants = f", {args.variants} variants" if args.variants else ""
        setting = ("default annotate config" if not (views or variants)
                   else f"default annotate config with{views}{variants} per image".replace("with,", "with"))
        record(f"Annotation throughput at {args.side} px{views}{variants}", figures(single, rays, scaling),
               f"{single['images']} source images at {args.side} px (bundled photos under distinct names), "
               f"{setting}. Load average when it started: {load} (other jobs may share the machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
