"""Training throughput: the Ray Train + DeepSpeed path against a plain single-process loop.

Both runs use the same tiny model, the same LoRA recipe, the same preprocessed samples,
the same micro batch and the same number of optimizer steps:

1. baseline: one Python process, the batches preprocessed up front, torch AdamW, no Ray,
   no DeepSpeed;
2. platform: `run_train` with the tiny CPU recipe (Ray Data streaming and preprocessing,
   2 Ray Train workers, ZeRO-3 over gloo, checkpoints off, MLflow to a scratch sqlite).

samples/s counts optimizer-step samples over the steps' wall time (model loading, Ray
start-up and the export are outside both clocks). The overhead ratio is baseline / platform
samples/s per worker-process: how much of one core's training speed the distributed path
keeps. On a 2-core machine the two ZeRO-3 workers share the cores with Ray Data, so
this is an upper bound on the overhead, not the scaling a GPU node shows.

With --quality-steps N it then trains the tiny model for N steps on the train split and
evaluates the base (untrained) model and the trained export on the held-out test split with
the evaluation harness: referring type F1, score SRCC, grounding point-in-mask, against
chance (the untrained model, and for point-in-mask the mean target-mask area).

    .venv/bin/python bench/train.py --steps 12                        # about 3 minutes on 2 cores
    .venv/bin/python bench/train.py --steps 12 --quality-steps 400    # + about 4 minutes
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import REPO, record  # first: it sets the benchmarks' environment


def demo_stages():
    """The demo's stage overrides: the benchmark annotates and (for quality) trains as `make demo` does."""
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import DemoConfig

    return load_config(DemoConfig, REPO / "configs/demo.yaml", []).stages


def build_inputs(work: Path) -> tuple[Path, Path]:
    from iqa_spider.annotate.pipeline import run_annotate, write_builtin_photos
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig
    from iqa_spider.model.tiny import init_tiny

    model = init_tiny("qwen2_5_vl", work / "tiny", seed=0)
    write_builtin_photos(str(work / "photos"))
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={work / 'photos'}", f"output.uri={work / 'dq'}", *demo_stages().annotate_overrides])
    run_annotate(cfg)
    return model, work / "dq"


def baseline(cfg, steps: int) -> float:
    """samples/s of a plain loop: same model, recipe, micro batch and steps; one process."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText

    from iqa_spider.data.io import read_dataset
    from iqa_spider.train.loop import per_task_loss
    from iqa_spider.train.preprocess import Preprocessor, collate
    from iqa_spider.train.recipe import apply_recipe

    table = read_dataset(cfg.data.uri).to_pydict()
    rows = [i for i, s in enumerate(table["split"]) if s == cfg.data.split]
    pre = Preprocessor(cfg.model.path, cfg.data.max_seq_len, cfg.data.max_pixels, cfg.model.min_pixels,
                       cfg.model.max_pixels)
    mb = cfg.optim.micro_batch_size
    batches = []
    for step in range(steps):
        idx = [rows[(step * mb + j) % len(rows)] for j in range(mb)]
        raw = {k: np.array([table[k][i] for i in idx], dtype=object)
               for k in ("image", "image_uri", "question", "answer", "task")}
        batches.append(collate(pre(raw), 0))
    torch.manual_seed(cfg.optim.seed)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model.path)
    model, groups = apply_recipe(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    model.train()
    started = time.monotonic()
    for batch in batches:
        batch = dict(batch)
        labels, task_ids, answer_pos = batch.pop("labels"), batch.pop("task_id"), batch.pop("answer_pos")
        loss, _ = per_task_loss(model(**batch).logits, labels, task_ids, answer_pos)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * mb / (time.monotonic() - started)


def platform_path(cfg) -> tuple[float, float]:
    """(samples/s over all steps, steady samples/s: median of the second half's per-step rates,
    i.e. after Ray Data's and the workers' warm-up)."""
    import statistics

    from mlflow.tracking import MlflowClient

    from iqa_spider.train.job import run_train

    summary = run_train(cfg)
    samples = cfg.optim.max_steps * cfg.optim.micro_batch_size * cfg.optim.grad_accum * cfg.scaling.num_workers
    history = sorted(MlflowClient(cfg.tracking.uri).get_metric_history(summary["run_id"], "samples_per_s"),
                     key=lambda m: m.step)
    steady = statistics.median(m.value for m in history[len(history) // 2:])
    return samples / summary["metrics"]["train_seconds"], steady


QUALITY_KEYS = (  # (label, flattened metric key)
    ("score SRCC", "rating.srcc"),
    ("level accuracy", "rating.level_acc"),
    ("grounding point-in-mask", "grounding.all.point_acc"),
    ("grounding mIoU", "grounding.all.miou"),
    ("grounding position words", "grounding.all.position_acc"),  # fraction naming the true position
    ("referring short, type F1", "referring_short.type_f1"),
    ("referring long, type F1", "referring_long.type_f1"),
    ("global description, type F1", "global_desc.type_f1"),
)


def evaluate(model_dir: str, data: Path) -> dict[str, float]:
    from iqa_spider.config import load_config
    from iqa_spider.evaluate.config import EvaluateConfig
    from iqa_spider.evaluate.job import evaluate as run_eval
    from iqa_spider.evaluate.metrics import flatten_metrics

    cfg = load_config(EvaluateConfig, REPO / "configs/evaluate.yaml",
                      [f"model.path={model_dir}", f"data.uri={data}", "mlflow.enabled=false"])
    return flatten_metrics(run_eval(cfg)["metrics"])


def chance_point_in_mask(data: Path) -> float:
    """Mean fraction of the image a grounding target covers: a uniformly random point's hit rate."""
    import numpy as np

    from iqa_spider.data.io import read_dataset
    from iqa_spider.evaluate.metrics import target_mask

    t = read_dataset(str(data)).to_pylist()
    fracs = []
    for row in t:
        if row["task"] == "grounding" and row["split"] == "test":
            m = target_mask(row["target"], row["width"], row["height"])
            fracs.append(float(np.mean(m)))
    return float(np.mean(fracs)) if fracs else float("nan")


def quality(make_cfg, steps: int) -> str:
    from iqa_spider.train.export import HF_DIR
    from iqa_spider.train.job import run_train

    cfg = make_cfg(*demo_stages().train_overrides, f"optim.max_steps={steps}",
                   f"optim.warmup_steps={max(1, steps // 20)}", f"checkpoint.every_steps={steps + 1}",
                   f"output.run_name=bench-quality-{steps}")
    summary = run_train(cfg)
    base = evaluate(cfg.model.path, Path(cfg.data.uri))
    trained = evaluate(str(Path(summary["checkpoint"]) / HF_DIR), Path(cfg.data.uri))
    lines = ["| held-out metric | untrained (chance) | trained |", "| --- | ---: | ---: |"]
    for label, key in QUALITY_KEYS:
        lines.append(f"| {label} | {base.get(key, float('nan')):.3f} | {trained.get(key, float('nan')):.3f} |")
    lines.append(f"| grounding point-in-mask, uniform random point | {chance_point_in_mask(Path(cfg.data.uri)):.3f} | |")
    return "\n".join(lines) + "\n\n" + mapping_table(trained)


def mapping_table(metrics: dict[str, float]) -> str:
    """Text-to-point mappings on the same held-out grounding samples: on the trained model's own
    answers, and teacher-forced on the true answers (the mapping apart from what was written)."""
    from iqa_spider.infer.config import MAPPING_NAMES

    lines = ["| text-to-point mapping | point-in-mask (own answers) | mIoU | point-in-mask (true answers) | mIoU |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for m in MAPPING_NAMES:
        vals = [metrics.get(f"grounding.all.{which}.{m}.{k}", float("nan"))
                for which in ("mapping", "forced") for k in ("point_acc", "miou")]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quality-steps", type=int, default=0, help="also train this long and evaluate held-out")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import ray

    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import TrainConfig

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build_inputs(work)
        def make_cfg(*extra: str) -> TrainConfig:
            return load_config(TrainConfig, REPO / "configs/train/tiny_cpu.yaml", [
                f"data.uri={data}", f"model.path={model}", f"output.uri={work / 'runs'}",
                "tracking.register=false", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", *extra])

        cfg = make_cfg(f"optim.max_steps={args.steps}", f"checkpoint.every_steps={args.steps + 1}")
        base = baseline(cfg, args.steps)
        dist, steady = platform_path(cfg)
        held_out = quality(make_cfg, args.quality_steps) if args.quality_steps else ""
    workers = cfg.scaling.num_workers
    rows = [
        ("plain loop, 1 process, batches preprocessed up front (baseline)", f"{base:.2f}", "1.00"),
        (f"Ray Data -> Ray Train, {workers} workers, ZeRO-3 gloo, all steps", f"{dist:.2f}", f"{dist / base:.2f}"),
        ("  the same, steady state (second half of the steps)", f"{steady:.2f}", f"{steady / base:.2f}"),
        ("  steady, per worker process", f"{steady / workers:.2f}", f"{steady / workers / base:.2f}"),
    ]
    table = "| path | samples/s | vs baseline |\n| --- | --- | --- |\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows)
    notes = (f"{args.steps} optimizer steps, micro batch {cfg.optim.micro_batch_size}, tiny Qwen2.5-VL "
             f"(images of at most 224x224 px), fp32 on CPU. Overhead ratio (baseline / per-worker "
             f"samples/s, steady): {base / (steady / workers):.2f}x. "
             "All steps include Ray Data's start and the first batches' preprocessing; the baseline "
             "excludes its preprocessing.")
    print(table + "\n\n" + notes)
    if held_out:
        print(held_out)
    if not args.no_record:
        record("Training: Ray Train + DeepSpeed ZeRO-3 vs a plain loop", table, notes)
        if held_out:
            record(f"Training quality: tiny model, {args.quality_steps} CPU steps, held-out test split", held_out,
                   "Trained with the demo's overrides (configs/demo.yaml: "
                   f"{', '.join(demo_stages().train_overrides)}; max_steps from --quality-steps), "
                   "evaluated with configs/evaluate.yaml (its mapping, superpixel segmenter).")


if __name__ == "__main__":
    main()
