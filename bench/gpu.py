"""GPU benchmark at 7B scale: predictor vs naive loop, FLOP ceiling, one LoRA ZeRO-3 step.

Made to run on one H200 inside 8 minutes with nothing downloaded: a Qwen2.5-VL-7B-sized model
(the real ``Qwen2_5_VLForConditionalGeneration`` class, the 7B dimensions, random weights
created directly on the GPU in bf16), the project's own tokenizer (every IQA word one token,
so the predictor works) and the real image processor with the 7B recipe's pixel bounds,
synthetic 448x448 images (1024 patches, 256 image tokens each).

What it measures, each in its own guarded block (one failure still reports the others):

1. **Peak rates**: a large bf16 ``torch.matmul`` (FLOP/s, the ceiling below) and a device
   copy (bytes/s, for the decode roofline).
2. **Inference**, score + HyD-G grounding per image: ``Predictor.analyze`` (batched, shared
   image prefix, score from the suffix pass, batched greedy decoding) against the naive loop
   of bench/infer.py (one processor call + one ``generate`` per image per question), images/s.
   **FLOP ceiling**: the useful model FLOPs of one image (formula in :func:`infer_flops`)
   divided into the measured peak; reported as the fraction of that ceiling each path reaches.
   A roofline ceiling (decode steps bounded by reading the weights once per step per batch)
   is given beside it, since batched greedy decoding is memory-bound.
3. **Training**: optimizer steps of the 7B LoRA recipe (configs/train/qwen2_5_vl_7b_zero3.yaml:
   ``apply_recipe`` = LoRA r64 on the language model + vision tower and merger trained,
   gradient checkpointing, micro-batch 4 x grad-accum 4) under DeepSpeed ZeRO-3 in one
   process (world size 1) when deepspeed imports, else plain torch + peft (said in the
   output): tokens/s, MFU (formula in :func:`train_flops`), peak memory.

    python bench/gpu.py --toy          # CPU, tiny dimensions, fp32: a smoke run of the same code path
    python bench/gpu.py --record       # on the GPU: appends the figures to BENCHMARKS.md

How to run it on the device machine (wheels for deepspeed etc.): bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import signal
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "platform"))
sys.path.insert(0, str(HERE))

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

FAMILY = "qwen2_5_vl"
MODEL_YAML = REPO / "configs/model/qwen2_5_vl_7b.yaml"
TRAIN_YAML = REPO / "configs/train/qwen2_5_vl_7b_zero3.yaml"

# Qwen2.5-VL-7B-Instruct's dimensions (its released config.json). transformers'
# Qwen2_5_VLConfig defaults are the 72B text model, so every text value is set here; the
# vision defaults are the 7B tower's except hidden_size (1280 in the release).
TEXT_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
    rms_norm_eps=1e-6, use_sliding_window=False, max_window_layers=28, initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
VISION_7B = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, hidden_act="silu", in_channels=3,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, out_hidden_size=3584,
)

# Typical answers of the four-task dataset (lengths as the annotation pipeline writes them).
TRAIN_SAMPLES = (
    ("global_desc", "Assess the quality of the image with a detailed explanation.",
     "The image shows a red car parked near a stone building. Moderate blur affects the car in the bottom "
     "right of the image, causing soft and smeared edges. Severe noise affects the sky in the top left of the "
     "image, causing a grainy texture. Mild compression affects the trees on the left side of the image, "
     "causing blocky artifacts. Overall, the quality of the image is poor."),
    ("grounding", "Which is the most degraded region in the image?",
     "The most degraded region is the car in the bottom right of the image."),
    ("referring_long", "What distortions affect the curtain on the right side of the image?",
     "Moderate blur causes loss of fine detail. Mild noise introduces speckles in smooth areas."),
    ("rating", "How would you rate the quality of this image?", "The quality of the image is poor."),
)


class SectionTimeout(BaseException):
    """A BaseException, so that libraries' ``except Exception`` blocks cannot swallow it."""


@contextlib.contextmanager
def time_guard(seconds: float):
    """Raise SectionTimeout inside the block after ``seconds`` (SIGALRM; main thread)."""
    def handler(signum, frame):
        raise SectionTimeout(f"stopped by the time guard after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Report:
    """Everything measured; each section fills its part or records why it could not."""

    figures: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def fail(self, section: str, exc: BaseException) -> None:
        msg = f"{section}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.errors.append(msg)
        print(f"[gpu.py] {msg}", file=sys.stderr)
        if not isinstance(exc, SectionTimeout):
            traceback.print_exc()


def log(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- peak rates


def peak_matmul(torch, device, dtype, n: int, reps: int) -> float:
    """FLOP/s of an n x n x n matmul (3 warm-ups, median of ``reps`` timed)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(torch, device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(torch, device)
        times.append((time.perf_counter() - t0) / 5)
    del a, b
    return 2 * n ** 3 / statistics.median(times)


def peak_copy(torch, device, nbytes: int, reps: int) -> float:
    """Bytes/s of a device copy, counting bytes read + written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(torch, device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(torch, device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / statistics.median(times)


# ----------------------------------------------------------------------------- model


def model_config(toy: bool, vocab_size: int, token_ids: dict):
    from transformers import Qwen2_5_VLConfig

    from iqa_spider.model.tiny import tiny_config

    if toy:
        return tiny_config(FAMILY, vocab_size, token_ids)
    text = dict(TEXT_7B, model_type="qwen2_5_vl_text", **token_ids)
    text["vocab_size"] = max(TEXT_7B["vocab_size"], vocab_size)
    vision = dict(VISION_7B, model_type="qwen2_5_vl_vision")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)


def config_processor_tokenizer(toy: bool):
    """(model config, the real processor, the project's tokenizer)."""
    import yaml

    from iqa_spider.model.tiny import _token_ids, build_processor
    from iqa_spider.model.tokenizer import build_tokenizer

    tok = build_tokenizer(FAMILY)
    token_ids = _token_ids(tok)
    config = model_config(toy, len(tok), token_ids)
    processor = build_processor(FAMILY, tok)
    if not toy:  # the 7B recipe's pixel bounds: a 448x448 image stays 448x448 (1024 patches)
        mcfg = yaml.safe_load(MODEL_YAML.read_text())["model"]
        processor.image_processor.size = {"shortest_edge": int(mcfg["min_pixels"]),
                                          "longest_edge": int(mcfg["max_pixels"])}
    return config, processor, tok


def build_model(args, torch, device, dtype):
    """(model, processor, tokenizer, config) with random weights made on ``device`` in ``dtype``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from iqa_spider.model.tiny import _generation_config, _token_ids

    config, processor, tok = config_processor_tokenizer(args.toy)
    token_ids = _token_ids(tok)
    t0 = time.perf_counter()
    # Parameters are allocated on the device in the target dtype and initialised there by the
    # model's own initialisers: no CPU copy, no 16 GB host-to-device transfer.
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if next(model.parameters()).device != device:  # a transformers that ignores the device context
        model.to(device)
    sync(torch, device)
    model.generation_config = _generation_config(token_ids)
    model.eval()
    return model, processor, tok, config, time.perf_counter() - t0


def param_counts(model) -> dict:
    inner = model.model
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    vis = inner.visual
    return {
        "total": n(model),
        "vision_embed": n(vis.patch_embed),
        "vision_blocks": n(vis.blocks),
        "vision_merger": n(vis.merger),
        "lm_layers": n(inner.language_model.layers),
        "embed": n(inner.language_model.embed_tokens),
        "lm_head": n(model.lm_head),
    }


def synthetic_images(n: int, side: int, seed: int = 0):
    """Smooth random colour fields with fine noise on top: side x side RGB."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
        arr = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def prompt_tokens(eng, processor, cfg, image, questions: dict) -> dict:
    """Token counts of the prompt parts, from the real processor on a real image: the
    shared prefix (image tokens included) and each question's suffix as the engine builds it."""
    import numpy as np

    enc = processor(text=[eng.prompt.prefix], images=[image], return_tensors="pt")
    grid = enc["image_grid_thw"][0].tolist()
    patches = int(np.prod(grid))
    return {"patches": patches, "grid": grid, "prefix": int(enc["input_ids"].shape[1]),
            "image_tokens": patches // cfg.vision_config.spatial_merge_size ** 2,
            **{name: len(eng._suffix_ids(q)[0]) for name, q in questions.items()}}


# ----------------------------------------------------------------------------- FLOP model


def vision_flops(cfg, pc: dict, patches: int) -> float:
    """Forward FLOPs of the vision tower on one image of ``patches`` patches:
    2 * (patch-embed + block params) * patches + 2 * merger params * patches / merge^2
    + attention 4 * patches * ctx * hidden per block (ctx = the window's patches in windowed
    blocks, all patches in the full-attention ones)."""
    v = cfg.vision_config
    merge = v.spatial_merge_size ** 2
    window = (v.window_size // v.patch_size) ** 2  # patches per attention window (8x8 = 64 at 7B)
    full = set(v.fullatt_block_indexes)
    attn = sum(4 * patches * (patches if i in full else min(window, patches)) * v.hidden_size for i in range(v.depth))
    return 2 * (pc["vision_embed"] + pc["vision_blocks"]) * patches + 2 * pc["vision_merger"] * patches / merge + attn


def lm_flops(cfg, pc: dict, new: int, ctx: int) -> float:
    """Forward FLOPs of the language model's layers for ``new`` tokens appended after ``ctx``
    cached ones: 2 * layer params * new + attention 4 * layers * (heads * head_dim) * sum of
    contexts (causal). The LM head is counted apart (only where logits are computed)."""
    t = cfg.get_text_config()
    d_q = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    ctx_sum = new * ctx + new * (new + 1) / 2
    return 2 * pc["lm_layers"] * new + 4 * t.num_hidden_layers * d_q * ctx_sum


def infer_flops(cfg, pc: dict, patches: int, prefix: int, s_score: int, s_ground: int, gen: float) -> dict:
    """Useful FLOPs of score + one grounding answer for one image (what an ideal engine does):
    vision tower once; the image prefix (``prefix`` tokens, image tokens included) once; the
    score suffix and the grounding suffix each once after it; ``gen`` greedy tokens (``gen``
    LM-head calls over the full vocabulary, ``gen - 1`` one-token forward passes)."""
    head = 2 * pc["lm_head"]
    decode = sum(lm_flops(cfg, pc, 1, prefix + s_ground + i) for i in range(max(0, math.ceil(gen) - 1)))
    parts = {
        "vision": vision_flops(cfg, pc, patches),
        "prefix": lm_flops(cfg, pc, prefix, 0),
        "suffixes": lm_flops(cfg, pc, s_score, prefix) + lm_flops(cfg, pc, s_ground, prefix),
        "decode": decode + head * gen,
    }
    parts["total"] = sum(parts.values())
    return parts


def decode_roofline_s(cfg, pc: dict, rows: int, prefix: int, steps: float, peak_flops: float, bw: float,
                      bytes_per_param: int) -> float:
    """Lower bound on the decode time of one batch of ``rows`` answers: each step reads every
    LM weight once (shared by the rows) plus each row's KV cache, or does its FLOPs, whichever
    takes longer."""
    t = cfg.get_text_config()
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv_per_tok = 2 * t.num_hidden_layers * t.num_key_value_heads * hd * bytes_per_param
    w_bytes = (pc["lm_layers"] + pc["lm_head"]) * bytes_per_param
    total = 0.0
    for i in range(math.ceil(steps)):
        by = w_bytes + rows * (prefix + i) * kv_per_tok
        fl = rows * (lm_flops(cfg, pc, 1, prefix + i) + 2 * pc["lm_head"])
        total += max(by / bw, fl / peak_flops)
    return total


def train_flops(cfg, pc: dict, n_lora: int, rows_tokens: list[int], patches_per_image: int,
                logits_tokens: int) -> dict:
    """Model FLOPs of one micro-batch of the LoRA recipe (for MFU; recomputation excluded):

    - forward F: vision tower on every image, LM layers on every row's real tokens (causal
      attention), LM head on every position (the loss reads all logits), LoRA 2 * N_lora per token;
    - backward: input gradients everywhere (about F again: the trained vision tower sits below
      every LM layer), weight gradients only for trained weights: the vision tower (its forward
      again) and LoRA (4 * N_lora per token in all with its input gradient).

    So model FLOPs = 3 * F_vision + 2 * (F_lm + F_head) + 6 * N_lora * tokens. Gradient
    checkpointing adds a recomputed forward (counted in ``hfu`` only)."""
    tokens = sum(rows_tokens)
    f_vis = len(rows_tokens) * vision_flops(cfg, pc, patches_per_image)
    f_lm = sum(lm_flops(cfg, pc, t, 0) for t in rows_tokens)
    f_head = 2 * pc["lm_head"] * logits_tokens
    model = 3 * f_vis + 2 * (f_lm + f_head) + 6 * n_lora * tokens
    return {"model": model, "recompute": f_vis + f_lm + 2 * n_lora * tokens, "tokens": tokens}


# ----------------------------------------------------------------------------- inference


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure_inference(args, rep: Report, torch, device, model, processor, cfg, pc, peak, bw, bytes_per_param,
                      deadline) -> None:
    import numpy as np

    import infer as bench_infer  # bench/infer.py: the naive loop and the predictor call
    from iqa_spider.infer.config import HYD_QUESTION, InferConfig
    from iqa_spider.infer.engine import Query
    from iqa_spider.infer.predictor import Predictor
    from iqa_spider.vocab import SCORE_QUESTION

    f = rep.figures
    images = synthetic_images(args.images, args.side)
    sizes = [int(b) for b in str(args.batch_size).split(",")]
    predictors = {}
    for bs in sizes:
        icfg = InferConfig(batch_size=bs, max_rows=max(32, bs), max_new_tokens=args.max_new_tokens, describe=False)
        predictors[bs] = Predictor(model, processor, icfg)
    eng = predictors[sizes[0]].engine
    # Count the greedy tokens of every grounding answer (both paths end in Engine._result).
    gen_counts: list[int] = []
    orig_result = eng._result

    def counting_result(tokens, watch, cap):
        res = orig_result(tokens, watch, cap)
        gen_counts.append(len(res.token_ids) + (0 if not res.finished else 1))
        return res

    for p in predictors.values():
        p.engine._result = counting_result

    counts = prompt_tokens(eng, processor, cfg, images[0], {
        "score": Query(SCORE_QUESTION, mode="score"), "ground": Query(HYD_QUESTION, max_new_tokens=args.max_new_tokens)})
    grid, patches, prefix = counts["grid"], counts["patches"], counts["prefix"]
    s_score, s_ground = counts["score"], counts["ground"]
    f.update(patches=patches, prefix_tokens=prefix, image_tokens=counts["image_tokens"],
             suffix_score=s_score, suffix_ground=s_ground, image_px=f"{images[0].width}x{images[0].height}",
             processed_px=f"{grid[1] * cfg.vision_config.patch_size}x{grid[2] * cfg.vision_config.patch_size}")

    log("inference warm-up")
    for bs, p in predictors.items():
        bench_infer.predictor_path(p, images[:bs], HYD_QUESTION)
    bench_infer.naive_loop(predictors[sizes[0]], images[:1], HYD_QUESTION, args.max_new_tokens)
    sync(torch, device)

    # The CPU part of the prefill (image resize/normalise + tokenising), which the engine runs
    # serially before each batch's GPU work: its share says whether it must be overlapped.
    try:
        nb = min(max(sizes), len(images))
        t_proc, _ = median_time(lambda: processor(text=[eng.prompt.prefix] * nb, images=images[:nb], padding=True,
                                                  return_tensors="pt"), 3)
        f["processor_ms"] = 1000 * t_proc / nb
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001
        rep.fail("inference: processor timing", exc)

    pred_runs = {}
    for bs, p in predictors.items():
        if time.monotonic() > deadline:
            rep.errors.append(f"inference: predictor batch {bs} skipped (time guard)")
            continue
        try:
            log(f"predictor, batch {bs}: {len(images)} images x {args.repeats}")
            gen_counts.clear()
            t, out = median_time(lambda p=p: bench_infer.predictor_path(p, images, HYD_QUESTION), args.repeats)
            pred_runs[bs] = (t, out, statistics.mean(gen_counts) if gen_counts else float("nan"))
            f[f"pred_ips_bs{bs}"] = len(images) / t
            f[f"pred_gen_bs{bs}"] = pred_runs[bs][2]
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001
            rep.fail(f"inference: predictor batch {bs}", exc)

    # The FLOP ceiling of the same work, from the tokens the predictor actually generated
    # (the cap when no predictor run finished).
    gen = next((r[2] for r in pred_runs.values()), float(args.max_new_tokens))
    fl = infer_flops(cfg, pc, patches, prefix, s_score, s_ground, gen)
    f["flops_per_image"] = fl
    if peak:
        f["ceiling_ips"] = peak / fl["total"]
        for bs in pred_runs:
            f[f"pred_frac_bs{bs}"] = f[f"pred_ips_bs{bs}"] / f["ceiling_ips"]
            if bw:
                non_decode = (fl["total"] - fl["decode"]) / peak
                roof = non_decode + decode_roofline_s(cfg, pc, bs, prefix + s_ground, gen, peak, bw,
                                                      bytes_per_param) / bs
                f[f"roofline_ips_bs{bs}"] = 1 / roof
                f[f"pred_roof_frac_bs{bs}"] = f[f"pred_ips_bs{bs}"] * roof

    n_naive = min(args.naive_images, len(images))
    try:
        log(f"naive loop: {n_naive} images x {args.naive_repeats}")
        gen_counts.clear()
        with time_guard(max(1.0, deadline - time.monotonic())):
            t_naive, naive = median_time(
                lambda: bench_infer.naive_loop(predictors[sizes[0]], images[:n_naive], HYD_QUESTION,
                                               args.max_new_tokens), args.naive_repeats)
        f["naive_ips"] = n_naive / t_naive
        f["naive_gen"] = statistics.mean(gen_counts) if gen_counts else float("nan")
        f["naive_images"] = n_naive
        if f.get("ceiling_ips"):
            f["naive_frac"] = f["naive_ips"] / f["ceiling_ips"]
        # Agreement on the naive subset: exact in fp32 (toy); in bf16 batching changes the
        # rounding, so only the share of identical greedy answers is reported.
        if pred_runs:
            first = (pred_runs.get(sizes[0]) or next(iter(pred_runs.values())))[1][:n_naive]
            if args.toy:
                bench_infer.agree(first, naive)
                f["agree"] = "same level probabilities (1e-4) and same greedy answers"
            else:
                same = sum(a[1].answer == b[1].answer for a, b in zip(first, naive))
                dp = max(float(np.max(np.abs(np.array(a[0].level_probs) - np.array(b[0].level_probs))))
                         for a, b in zip(first, naive))
                f["agree"] = f"{same}/{len(naive)} identical greedy answers; level probabilities within {dp:.3g}"
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001
        rep.fail("inference: naive loop", exc)
    finally:
        for p in predictors.values():
            p.engine._result = orig_result


# ----------------------------------------------------------------------------- training


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_batch(args, processor, hf_config, tcfg, pad_id: int, tmpdir: Path):
    """One micro-batch through the training preprocessing (Preprocessor.encode + collate)."""
    import numpy as np

    from iqa_spider.train.preprocess import Preprocessor, collate

    # The Preprocessor takes a model folder (config.json marks one), as training gives it.
    processor.save_pretrained(tmpdir)
    hf_config.save_pretrained(tmpdir)
    pre = Preprocessor(str(tmpdir), tcfg.data.max_seq_len, tcfg.data.max_pixels,
                       None if args.toy else tcfg.model.min_pixels, None if args.toy else tcfg.model.max_pixels)
    mb = tcfg.optim.micro_batch_size
    images = synthetic_images(mb, args.side, seed=1)
    samples = [TRAIN_SAMPLES[i % len(TRAIN_SAMPLES)] for i in range(mb)]
    blobs = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    batch = {"image": np.array(blobs, dtype=object), "image_uri": np.array([None] * mb, dtype=object),
             "question": np.array([s[1] for s in samples], dtype=object),
             "answer": np.array([s[2] for s in samples], dtype=object),
             "task": np.array([s[0] for s in samples], dtype=object)}
    return collate(pre(batch), pad_id)


def measure_training(args, rep: Report, torch, device, model, processor, cfg, pc, peak, deadline) -> None:
    import tempfile

    from iqa_spider.config.loader import load_config
    from iqa_spider.config.schemas import TrainConfig
    from iqa_spider.train.loop import per_task_loss
    from iqa_spider.train.recipe import apply_recipe, deepspeed_config

    f = rep.figures
    # One process on one device: the recipe's global batch (micro x accum x 8 GPUs) does not apply.
    overrides = ["data.uri=/tmp/unused", "output.uri=/tmp/unused", "scaling.num_workers=1",
                 "optim.global_batch_size=null"]
    if args.toy:
        overrides += ["optim.micro_batch_size=2", "optim.grad_accum=1", "deepspeed.precision=fp32"]
    if args.micro_batch:
        overrides.append(f"optim.micro_batch_size={args.micro_batch}")
    if args.grad_accum:
        overrides.append(f"optim.grad_accum={args.grad_accum}")
    tcfg = load_config(TrainConfig, TRAIN_YAML, overrides)
    on_gpu = device.type == "cuda"
    pad_id = int(cfg.get_text_config().pad_token_id or 0)
    with tempfile.TemporaryDirectory() as tmp:
        batch = train_batch(args, processor, cfg, tcfg, pad_id, Path(tmp))
    task_ids, answer_pos = batch.pop("task_id").to(device), batch.pop("answer_pos").to(device)
    labels = batch.pop("labels").to(device)
    inputs = {k: v.to(device) for k, v in batch.items()}
    dtype = next(model.parameters()).dtype
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    rows_tokens = inputs["attention_mask"].sum(1).tolist()
    patches_per_image = int(inputs["image_grid_thw"][0].prod())
    f["train_seq"] = int(inputs["input_ids"].shape[1])
    f["train_micro_batch"] = tcfg.optim.micro_batch_size
    f["train_grad_accum"] = tcfg.optim.grad_accum

    model.config.use_cache = False
    if tcfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model, groups = apply_recipe(model, tcfg)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f["train_trainable"] = n_train
    f["train_lora"] = n_lora

    try:
        import deepspeed
        have_ds = not args.no_deepspeed
        if args.no_deepspeed:
            rep.notes.append("--no-deepspeed: training ran as plain torch + peft")
    except Exception as exc:  # noqa: BLE001 - an import failure (not the time guard) means: fall back
        have_ds = False
        rep.notes.append(f"deepspeed not importable ({type(exc).__name__}: {exc}); training ran as plain torch + "
                         "peft (bf16 weights, torch AdamW on the trained bf16 parameters, no ZeRO partitioning)")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    if have_ds:
        import deepspeed

        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                     ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(k, v)
        try:
            deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
        except Exception as exc:  # noqa: BLE001 - nothing is partitioned yet: plain torch still works
            have_ds = False
            rep.notes.append(f"deepspeed.init_distributed failed ({type(exc).__name__}: {exc}); training ran as "
                             "plain torch + peft")
    if have_ds:
        ds_cfg = deepspeed_config(tcfg, 1, on_gpu)
        # DeepSpeed's FusedAdam is a CUDA extension compiled at first use (a minute or more of
        # nvcc): use torch's AdamW (foreach) as the recipe does on CPU.
        ds_cfg["optimizer"]["params"]["torch_adam"] = True
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
        f["train_mode"] = (f"DeepSpeed ZeRO-{tcfg.deepspeed.zero_stage} ({ds_cfg['bf16']['enabled'] and 'bf16' or 'fp32'}"
                           f", world size 1, torch AdamW)")

        def micro_step():
            out = engine(**inputs)
            loss, _ = per_task_loss(out.logits, labels, task_ids, answer_pos)
            engine.backward(loss)
            engine.step()
            return loss
        engine.train()
    else:
        opt = torch.optim.AdamW(groups, lr=tcfg.optim.lr, weight_decay=tcfg.optim.weight_decay)
        f["train_mode"] = "plain torch + peft (no DeepSpeed)"
        accum = tcfg.optim.grad_accum
        state = {"k": 0}

        def micro_step():
            out = model(**inputs)
            loss, _ = per_task_loss(out.logits, labels, task_ids, answer_pos)
            (loss / accum).backward()
            state["k"] += 1
            if state["k"] % accum == 0:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], tcfg.optim.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss
        model.train()

    step_times, losses = [], []
    total_steps = args.train_warmup + args.train_steps
    for step in range(total_steps):
        if step >= args.train_warmup and step_times and time.monotonic() + step_times[-1] > deadline:
            rep.errors.append(f"training: stopped after {len(step_times)} timed step(s) (time guard)")
            break
        log(f"training step {step + 1}/{total_steps} ({'warm-up' if step < args.train_warmup else 'timed'})")
        sync(torch, device)
        t0 = time.perf_counter()
        for _ in range(tcfg.optim.grad_accum):
            losses.append(float(micro_step().detach()))
        sync(torch, device)
        if step >= args.train_warmup:
            step_times.append(time.perf_counter() - t0)
    if not step_times:
        raise RuntimeError("no timed training step finished")
    t_step = statistics.median(step_times)
    fl = train_flops(cfg, pc, n_lora, rows_tokens, patches_per_image, logits_tokens=int(labels.numel()))
    accum = tcfg.optim.grad_accum
    f["train_step_s"] = t_step
    f["train_tokens_per_s"] = fl["tokens"] * accum / t_step
    f["train_samples_per_s"] = len(rows_tokens) * accum / t_step
    f["train_loss"] = (losses[0], losses[-1])
    f["train_flops_step"] = fl["model"] * accum
    if peak:
        f["train_mfu"] = fl["model"] * accum / t_step / peak
        recompute = fl["recompute"] if tcfg.deepspeed.gradient_checkpointing else 0.0
        f["train_hfu"] = (fl["model"] + recompute) * accum / t_step / peak
    if on_gpu:
        f["train_peak_alloc"] = torch.cuda.max_memory_allocated(device)
        f["train_peak_reserved"] = torch.cuda.max_memory_reserved(device)
    if have_ds:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- report


def fmt_flops(x: float) -> str:
    for unit, s in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= s:
            return f"{x / s:.2f} {unit}"
    return f"{x:.0f} "


def render(args, rep: Report, device_name: str, dtype_name: str) -> str:
    f = rep.figures
    smoke = args.toy or not f.get("on_gpu")
    g = lambda k, spec="{:.2f}", d="n/a": (spec.format(f[k]) if f.get(k) is not None else d)  # noqa: E731
    title = "GPU benchmark: 7B-sized predictor vs naive loop, FLOP ceiling, LoRA ZeRO-3 step (bench/gpu.py)"
    lines = [f"## {title}", ""]
    if smoke:
        lines += ["**Smoke run on CPU with tiny dimensions (--toy): checks the code path only; these are not "
                  "measurements and are not recorded.**", ""]
    pc = f.get("params") or {}
    model_desc = ("tiny random Qwen2.5-VL (the tests' dimensions)" if args.toy else
                  "Qwen2.5-VL-7B-sized random weights (28 layers, hidden 3584, 28/4 heads, MLP 18944, "
                  "vocab 152064; vision 32 blocks x 1280)")
    peak_s = fmt_flops(f["peak_flops"]) + "FLOP/s" if f.get("peak_flops") else "n/a"
    bw_s = f"{f['peak_bw'] / 1e9:.0f} GB/s" if f.get("peak_bw") else "n/a"
    alloc_s = f"{f['train_peak_alloc'] / 2**30:.1f} GiB" if f.get("train_peak_alloc") else "n/a"
    resv_s = f"{f['train_peak_reserved'] / 2**30:.1f} GiB" if f.get("train_peak_reserved") else "n/a"
    lines += [
        f"Model: {model_desc}"
        f", {pc.get('total', 0) / 1e6:.2f} M parameters, {dtype_name}, SDPA attention; device {device_name}. "
        f"Images: synthetic {f.get('image_px', '?')} px, processed at {f.get('processed_px', '?')} = "
        f"{f.get('patches', '?')} patches, {f.get('image_tokens', '?')} image tokens; prefix {f.get('prefix_tokens', '?')} "
        f"tokens, suffixes {f.get('suffix_score', '?')} (score) / {f.get('suffix_ground', '?')} (HyD-G); grounding "
        f"answers up to {args.max_new_tokens} new tokens. Model built on the device in {g('build_s', '{:.1f}')} s; whole "
        f"run {g('wall_s', '{:.0f}')} s.",
        "",
        "| peak rate | measured |",
        "| --- | ---: |",
        f"| {dtype_name} matmul {args.matmul_n}^3 (`torch.matmul`) | {peak_s} |",
        f"| device copy (read + write) | {bw_s} |",
        "",
    ]
    fl = f.get("flops_per_image")
    sizes = [int(b) for b in str(args.batch_size).split(",")]
    if fl or f.get("naive_ips"):
        lines += ["### Inference: score + HyD-G grounding per image", "",
                  "| path | images/s | mean greedy tokens | fraction of FLOP ceiling | fraction of roofline |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines.append(f"| naive loop (bench/infer.py `naive_loop`: per image 2 processor calls + 2 `generate`), "
                     f"{f.get('naive_images', '?')} images | {g('naive_ips')} | {g('naive_gen', '{:.1f}')} | "
                     f"{g('naive_frac', '{:.2%}')} | |")
        for bs in sizes:
            if f.get(f"pred_ips_bs{bs}") is None:
                continue
            sp = f[f"pred_ips_bs{bs}"] / f["naive_ips"] if f.get("naive_ips") else None
            lines.append(f"| predictor (`Predictor.analyze`), batch {bs}, {args.images} images | "
                         f"{g(f'pred_ips_bs{bs}')}{f' (**{sp:.1f}x** naive)' if sp else ''} | "
                         f"{g(f'pred_gen_bs{bs}', '{:.1f}')} | {g(f'pred_frac_bs{bs}', '{:.2%}')} | "
                         f"{g(f'pred_roof_frac_bs{bs}', '{:.1%}')} (ceiling {g(f'roofline_ips_bs{bs}', '{:.1f}')} images/s) |")
        lines.append("")
        if fl:
            lines += [f"FLOP ceiling: {g('ceiling_ips', '{:.1f}')} images/s = peak / useful FLOPs per image "
                      f"{fmt_flops(fl['total'])}FLOP (vision {fmt_flops(fl['vision'])}, prefix {fmt_flops(fl['prefix'])}, "
                      f"suffixes {fmt_flops(fl['suffixes'])}, decode incl. LM head {fmt_flops(fl['decode'])}). Useful FLOPs: "
                      "vision tower once, image prefix once, each question's suffix once, the greedy tokens; "
                      "2 x params x tokens + causal attention 4 x layers x d x context. The roofline ceiling bounds each "
                      "decode step by reading all LM weights once per batch plus each row's KV cache at the measured "
                      "copy rate.", ""]
        if f.get("processor_ms"):
            lines += [f"Processor (CPU: resize, normalise, tokenise; serial before each batch's model work): "
                      f"{f['processor_ms']:.1f} ms per image.", ""]
        if f.get("agree"):
            lines += [f"Paths agree on the naive subset: {f['agree']}.", ""]
    if f.get("train_step_s"):
        lines += ["### Training: one optimizer step of the 7B LoRA recipe", "",
                  "| figure | value |", "| --- | ---: |",
                  f"| mode | {f.get('train_mode')} |",
                  f"| micro-batch x grad-accum, sequence | {f['train_micro_batch']} x {f['train_grad_accum']}, "
                  f"{f['train_seq']} tokens (padded) |",
                  f"| trainable parameters (LoRA r{args.lora_r_note} + vision tower + merger) | "
                  f"{f['train_trainable'] / 1e6:.1f} M "
                  f"(LoRA {f['train_lora'] / 1e6:.1f} M) |",
                  f"| step time (median of timed steps) | {f['train_step_s']:.3f} s |",
                  f"| tokens/s (real tokens) | {f['train_tokens_per_s']:.0f} |",
                  f"| samples/s | {f['train_samples_per_s']:.2f} |",
                  f"| model FLOPs per step | {fmt_flops(f['train_flops_step'])}FLOP |",
                  f"| MFU | {g('train_mfu', '{:.1%}')} (HFU with recomputation {g('train_hfu', '{:.1%}')}) |",
                  f"| peak memory allocated / reserved (CUDA) | {alloc_s} / {resv_s} |",
                  "| loss, first / last micro-batch (finite check; DeepSpeed's LR warm-up starts at 0) | "
                  f"{f['train_loss'][0]:.3f} -> {f['train_loss'][1]:.3f} |",
                  "",
                  "MFU = model FLOPs / (step time x peak): 3 x vision forward + 2 x (LM layers + LM head) forward "
                  "+ 6 x LoRA params x tokens (frozen weights need input gradients only, trained ones weight "
                  "gradients too); HFU adds the recomputed forward of gradient checkpointing.", ""]
    for n in rep.notes:
        lines.append(f"Note: {n}  ")
    if rep.errors:
        lines += ["", "Not measured / failed:", ""] + [f"- {e}" for e in rep.errors]
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", action="store_true", help="tiny dimensions, fp32, CPU: a smoke run of the same path")
    ap.add_argument("--record", action="store_true", help="append the section to BENCHMARKS.md (GPU runs only)")
    ap.add_argument("--md", default=None, help="also write the markdown section to this file")
    ap.add_argument("--device", default=None, help="default: cuda when present (cpu with --toy)")
    ap.add_argument("--images", type=int, default=None, help="predictor images (default 64; toy 4)")
    ap.add_argument("--naive-images", type=int, default=None, help="naive-loop images (default 8; toy 2)")
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--batch-size", default=None, help="predictor batch size(s), comma separated (default 8,32; toy 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="grounding answer cap (default 32; toy 8)")
    ap.add_argument("--repeats", type=int, default=None, help="timed predictor runs, median (default 3; toy 1)")
    ap.add_argument("--naive-repeats", type=int, default=1)
    ap.add_argument("--train-warmup", type=int, default=1, help="untimed optimizer steps first")
    ap.add_argument("--train-steps", type=int, default=None, help="timed optimizer steps (default 2; toy 1)")
    ap.add_argument("--micro-batch", type=int, default=None, help="override the recipe's micro-batch size")
    ap.add_argument("--grad-accum", type=int, default=None, help="override the recipe's grad accumulation")
    ap.add_argument("--no-deepspeed", action="store_true", help="train with plain torch + peft")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: peak,infer,train")
    ap.add_argument("--matmul-n", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="whole-run guard in seconds (default 450; toy 110)")
    args = ap.parse_args(argv)
    toy_defaults = dict(images=4, naive_images=2, batch_size="2", max_new_tokens=8, repeats=1, train_steps=1,
                        matmul_n=512, time_limit=110.0)
    gpu_defaults = dict(images=64, naive_images=8, batch_size="8,32", max_new_tokens=32, repeats=3, train_steps=2,
                        matmul_n=8192, time_limit=450.0)
    for k, v in (toy_defaults if args.toy else gpu_defaults).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lora_r_note = "64"
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    deadline = t_start + args.time_limit
    rep = Report()

    import torch

    if args.device is None:
        args.device = "cpu" if args.toy or not torch.cuda.is_available() else "cuda"
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    dtype = torch.float32 if args.toy else torch.bfloat16
    on_gpu = device.type == "cuda"
    rep.figures["on_gpu"] = on_gpu
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({os.cpu_count()} cores)"
    dtype_name = str(dtype).replace("torch.", "")
    bytes_per_param = torch.tensor([], dtype=dtype).element_size()
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True

    peak = bw = None
    if "peak" not in skip:
        try:
            with time_guard(min(60, deadline - time.monotonic())):
                peak = peak_matmul(torch, device, dtype, args.matmul_n, 10 if on_gpu else 3)
                bw = peak_copy(torch, device, (4 << 30) if on_gpu else (64 << 20), 10 if on_gpu else 3)
            rep.figures.update(peak_flops=peak, peak_bw=bw)
            log(f"peak {dtype_name} matmul {fmt_flops(peak)}FLOP/s, copy {bw / 1e9:.0f} GB/s")
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001
            rep.fail("peak rates", exc)

    model = processor = cfg = pc = None
    try:
        with time_guard(min(240, deadline - time.monotonic())):
            log("building the model on the device")
            model, processor, _tok, cfg, build_s = build_model(args, torch, device, dtype)
            pc = param_counts(model)
            rep.figures.update(build_s=build_s, params=pc)
            log(f"built {pc['total'] / 1e6:.1f} M parameters in {build_s:.1f} s")
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001
        rep.fail("model build", exc)

    if model is not None and "infer" not in skip:
        # inference may use what is left minus a share kept for training
        reserve = 0 if "train" in skip else (0.35 * args.time_limit)
        infer_deadline = deadline - reserve
        try:
            with time_guard(max(1.0, infer_deadline - time.monotonic() + 5)):
                measure_inference(args, rep, torch, device, model, processor, cfg, pc, peak, bw, bytes_per_param,
                                  infer_deadline)
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001
            rep.fail("inference", exc)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()

    if model is not None and "train" not in skip:
        try:
            with time_guard(max(1.0, deadline - time.monotonic())):
                measure_training(args, rep, torch, device, model, processor, cfg, pc, peak, deadline)
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001
            rep.fail("training", exc)

    rep.figures["wall_s"] = time.monotonic() - t_start
    text = render(args, rep, device_name, dtype_name)
    print(text, flush=True)
    if args.md:
        Path(args.md).write_text(text)
    if args.record:
        if not on_gpu or args.toy:
            print("not recorded: --record is for GPU runs (absolute figures only from GPUs)", file=sys.stderr)
        else:
            from common import record

            body = text.split("\n", 2)[2]  # record() writes its own heading
            record("GPU benchmark: 7B-sized predictor vs naive loop, FLOP ceiling, LoRA ZeRO-3 step", body)
    return 0 if not rep.errors else 1


if __name__ == "__main__":
    sys.exit(main())
