"""Inference throughput: score + ground per image, predictor vs a naive loop.

Both paths answer the same two questions per image with the same model in the same process:

- the Q-Align score ("How would you rate the quality of this image?" + the teacher-forced
  "The quality of the image is", softmax over the five level words), and
- the HyD-G grounding question (greedy answer up to ``--max-new-tokens``, the position-word
  logits at every step, text-to-point).

**naive**: for every image and every question, one processor call (the whole prompt with the
image) and one ``model.generate`` (for the score: one new token, reading its logits), exactly
what a straightforward loop does. **predictor**: ``Predictor.analyze`` (images batched, one
prefill of the image prefix per image shared by both questions, the score read from the
suffix pass without generating, greedy decoding of the grounding rows in one batch).

Both then run the same text-to-point and, with ``--masks``, the same segmenter, so the ratio
is the engine's. The script checks that the two paths agree (same level probabilities, same
greedy tokens) before it reports anything.

    .venv/bin/python bench/infer.py                       # tiny random Qwen2.5-VL, CPU
    .venv/bin/python bench/infer.py --model models:/iqa-spider@champion --device cuda --images 64

With ``--md FILE`` the markdown section (figures and the command) is written to FILE.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(n: int, side: int, seed: int = 0):
    """n images from scikit-image's bundled photos, random crops of varied aspect ratio."""
    from PIL import Image
    from skimage import data as skdata

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
        arr = getattr(skdata, name)()
        photos.append(arr if arr.ndim == 3 else np.stack([arr] * 3, -1))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = photos[i % len(photos)][..., :3]
        h, w = arr.shape[:2]
        aspect = rng.uniform(0.6, 1.6)
        cw, ch = int(min(w, side * aspect)), int(min(h, side / aspect))
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        out.append(Image.fromarray(np.ascontiguousarray(arr[y0:y0 + ch, x0:x0 + cw])))
    return out


def naive_loop(predictor, images, question: str, max_new_tokens: int):
    """One processor call + one generate per image per question."""
    import torch
    from transformers import GenerationConfig

    from iqa_spider.infer.engine import QueryResult
    from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

    eng = predictor.engine
    model, processor = eng.model, eng.processor
    watch = eng.positions.watch_ids
    out = []
    with torch.inference_mode():
        for image in images:
            # the score: teacher-forced prefix, one generated token, its logits
            inputs = processor(text=[eng.prompt.full_text(SCORE_QUESTION, SCORE_ANSWER_PREFIX)], images=[image],
                               return_tensors="pt").to(eng.device)
            gen = GenerationConfig(max_new_tokens=1, do_sample=False, num_beams=1, eos_token_id=eng.eos_ids,
                                   pad_token_id=eng.pad_id, output_logits=True, return_dict_in_generate=True)
            res = model.generate(**inputs, generation_config=gen)
            probs = torch.softmax(res.logits[0][0, eng.level_ids].float(), -1).tolist()
            score = QueryResult(level_probs=probs)
            # the grounding answer
            inputs = processor(text=[eng.prompt.full_text(question)], images=[image], return_tensors="pt").to(eng.device)
            gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   eos_token_id=eng.eos_ids, pad_token_id=eng.pad_id, output_logits=True,
                                   return_dict_in_generate=True)
            res = model.generate(**inputs, generation_config=gen)
            new = res.sequences[0, inputs["input_ids"].shape[1]:].cpu().numpy()
            logits = torch.stack([lg[0] for lg in res.logits]).float()[:, watch].cpu().numpy()
            ground = eng._result(new, logits, max_new_tokens)
            g = predictor.grounding_of(ground, question, image.width, image.height)
            out.append((predictor.score_of(score), g))
    return out


def predictor_path(predictor, images, question: str):
    res = predictor.analyze(images, describe=False, ground_questions=[question])
    return [(a.score, a.regions[0]) for a in res]


def agree(a, b, atol: float = 1e-4) -> None:
    for (sa, ga), (sb, gb) in zip(a, b):
        np.testing.assert_allclose(sa.level_probs, sb.level_probs, atol=atol)
        assert ga.answer == gb.answer, (ga.answer, gb.answer)
        for pa, pb in zip(ga.points, gb.points):
            assert abs(pa.x - pb.x) < 1e-2 and abs(pa.y - pb.y) < 1e-2


def timed_pair(fn_a, fn_b, repeats: int):
    """Median seconds of each function, runs interleaved (a, b, a, b, ...) so that load from
    other processes on a shared machine falls on both paths alike."""
    times: tuple[list[float], list[float]] = ([], [])
    results = [None, None]
    for _ in range(repeats):
        for k, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return statistics.median(times[0]), results[0], statistics.median(times[1]), results[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir or MLflow URI (default: a fresh tiny random model)")
    ap.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen3_vl"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--side", type=int, default=448, help="crop size (pixels) of the test images")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path (median reported)")
    ap.add_argument("--masks", action="store_true", help="also run the superpixel segmenter on the points")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--record", action="store_true", help="append the figures to BENCHMARKS.md")
    args = ap.parse_args(argv)

    # isort: off
    import common  # noqa: F401 - sets the benchmarks' environment before torch and transformers
    import torch
    # isort: on
    from iqa_spider.config.schemas import ModelConfig
    from iqa_spider.infer.config import HYD_QUESTION, InferConfig
    from iqa_spider.infer.predictor import GroundingHead, Predictor

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model
    if model_path is None:
        from iqa_spider.model.tiny import init_tiny

        model_path = str(init_tiny(args.family, Path(tempfile.mkdtemp(prefix="bench-infer-")) / args.family))
    cfg = InferConfig(batch_size=args.batch_size, max_rows=4 * args.batch_size, max_new_tokens=args.max_new_tokens,
                      describe=False)
    predictor = Predictor.load(ModelConfig(family=args.family, path=model_path, device=args.device,
                                           dtype=args.dtype), cfg)
    head = None
    if args.masks:
        from iqa_spider.infer.segmenters import SuperpixelSegmenter

        head = GroundingHead(predictor, SuperpixelSegmenter())
    images = make_images(args.images, args.side)

    def run_predictor():
        out = predictor_path(predictor, images, HYD_QUESTION)
        if head is not None:
            for im, (_, g) in zip(images, out):
                head.attach_masks(im, [g])
        return out

    def run_naive():
        out = naive_loop(predictor, images, HYD_QUESTION, args.max_new_tokens)
        if head is not None:
            for im, (_, g) in zip(images, out):
                head.attach_masks(im, [g])
        return out

    # warm-up (allocator, kernels) on two images, then a correctness check on all of them
    predictor_path(predictor, images[:2], HYD_QUESTION)
    naive_loop(predictor, images[:2], HYD_QUESTION, args.max_new_tokens)
    t_naive, naive, t_pred, pred = timed_pair(run_naive, run_predictor, args.repeats)
    agree(pred, naive)
    gen_tokens = statistics.mean(len(g.answer.split()) for _, g in pred)
    n = len(images)
    ips_naive, ips_pred = n / t_naive, n / t_pred
    n_params = sum(p.numel() for p in predictor.model.parameters())
    device = str(predictor.engine.device)
    cpu_note = f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}" if device == "cpu" else \
        torch.cuda.get_device_name(0)
    cmd = "python bench/infer.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "## Inference: score + ground per image, predictor vs naive loop (bench/infer.py)",
        "",
        f"Model: {args.model or f'tiny random {args.family} ({n_params / 1e6:.2f} M parameters)'}; device {device} "
        f"({cpu_note}); dtype {str(next(predictor.model.parameters()).dtype).replace('torch.', '')}; "
        f"{n} images, crops of about {args.side} px (varied aspect); grounding answers up to "
        f"{args.max_new_tokens} new tokens (mean {gen_tokens:.1f} words written); batch size {args.batch_size}; "
        f"segmenter: {'superpixel masks on both paths' if head else 'none (model work only)'}; "
        f"median of {args.repeats} interleaved runs per path. Both paths checked to give the same level probabilities "
        "(1e-4) and the "
        "same greedy answers.",
        "",
        "| path | what it does per image | seconds | images/s |",
        "| --- | --- | ---: | ---: |",
        f"| naive loop | 2 processor calls + 2 `generate` (score: 1 token; ground: greedy) | {t_naive:.2f} | "
        f"{ips_naive:.2f} |",
        f"| predictor (`Predictor.analyze`) | batched prefill of the image prefix once, score from the suffix "
        f"pass, batched greedy decoding | {t_pred:.2f} | {ips_pred:.2f} |",
        "",
        f"Speed-up: **{ips_pred / ips_naive:.2f}x** images/s.",
        "",
        f"Command: `{cmd.strip()}`",
        "",
    ]
    print("\n".join(lines))
    if args.record:
        from common import record

        record("Inference: score + ground per image, predictor vs naive loop", "\n".join(lines[2:-3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
