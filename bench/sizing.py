"""Sizing ceilings of the 7B model on a GPU, from the FLOP model of bench/gpu.py.

No weights and no GPU: the Qwen2.5-VL-7B-sized model is built on the meta device (shapes
only), token counts come from the real processor and the project's tokenizer, and the GPU
enters only through its spec rates (default: H200 SXM, 989 TFLOP/s dense bf16, 4.8 TB/s).

For each task mix it prints the images/s one GPU could reach at its peak (the FLOP ceiling,
and the roofline ceiling that also bounds each decoding step by reading the weights and the
KV cache), and how many GPUs a million images an hour would take at that ceiling; for the
training recipe, tokens/s and samples/s per GPU and per 8-GPU node at MFU 100 %. A ceiling is
a lower bound on GPUs, not a forecast: bench/gpu.py measures which fraction of it the
predictor and the training step reach (see docs/scoring.md for how the two combine).

    .venv/bin/python bench/sizing.py [--peak-tflops 989] [--bandwidth-tbs 4.8] [--batch 32] [--md FILE]
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import gpu  # bench/gpu.py: the 7B dimensions, the FLOP model, the recipe's files (sets the environment)

H200_BF16_TFLOPS = 989.0  # dense, SXM (NVIDIA's H200 datasheet; 1979 is with 2:4 sparsity)
H200_HBM_TBS = 4.8
NODE_GPUS = 8
# Images at the 7B recipe's pixel bounds: the smallest (min_pixels, 256 image tokens) and a
# 1 MP photo (1024 x 1024 is cut to max_pixels: about 1280 image tokens).
IMAGE_SIDES = (448, 1024)
DESCRIBE_QUESTION = "Assess the quality of the image with a detailed explanation."


@dataclass
class Mix:
    name: str
    grounding: bool
    describe: bool


MIXES = (Mix("score", False, False), Mix("score + grounding", True, False),
         Mix("score + grounding + global description", True, True))


def meta_model(config):
    """The 7B model with shapes only: parameter counts without memory or time."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(config)


def answer_tokens(tok, text: str) -> int:
    """Greedy tokens of an answer: its text plus the end-of-turn token."""
    return len(tok.encode(text, add_special_tokens=False)) + 1


def lora_params(model, tcfg) -> int:
    """LoRA parameters the recipe adds: r x (in + out) for each targeted linear layer."""
    import torch

    from iqa_spider.train.recipe import lora_target_regex

    pattern = re.compile(lora_target_regex(list(tcfg.lora.target_modules)))
    return sum(tcfg.lora.r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name))


def inference_rows(config, pc, processor, tok, peak: float, bw: float, batch: int) -> list[dict]:
    from iqa_spider.infer.config import HYD_QUESTION
    from iqa_spider.infer.engine import PromptParts
    from iqa_spider.vocab import SCORE_QUESTION

    prompt = PromptParts.from_processor(processor)
    suffix = lambda q: len(tok.encode(q + prompt.tail, add_special_tokens=False))  # noqa: E731
    s_score, s_ground, s_desc = suffix(SCORE_QUESTION), suffix(HYD_QUESTION), suffix(DESCRIBE_QUESTION)
    ground_gen = answer_tokens(tok, gpu.TRAIN_SAMPLES[1][2])
    desc_gen = answer_tokens(tok, gpu.TRAIN_SAMPLES[0][2])
    rows = []
    for side in IMAGE_SIDES:
        image = gpu.synthetic_images(1, side)[0]
        enc = processor(text=[prompt.prefix], images=[image], return_tensors="np")
        patches = int(enc["image_grid_thw"][0].prod())
        prefix = int(enc["input_ids"].shape[1])
        for mix in MIXES:
            # infer_flops counts score + one grounding answer; score alone drops the grounding
            # suffix and decode, a description adds its suffix and its decode.
            fl = gpu.infer_flops(config, pc, patches, prefix, s_score, s_ground if mix.grounding else 0,
                                 ground_gen if mix.grounding else 0)
            decode_s = gpu.decode_roofline_s(config, pc, batch, prefix + s_ground, ground_gen, peak, bw, 2) / batch \
                if mix.grounding else 0.0
            total = fl["total"]
            if mix.describe:
                desc = gpu.infer_flops(config, pc, patches, prefix, 0, s_desc, desc_gen)
                total += desc["suffixes"] + desc["decode"]
                decode_s += gpu.decode_roofline_s(config, pc, batch, prefix + s_desc, desc_gen, peak, bw, 2) / batch
                decode_flops = fl["decode"] + desc["decode"]
            else:
                decode_flops = fl["decode"]
            flop_ips = peak / total
            roof_ips = 1 / ((total - decode_flops) / peak + decode_s)
            rows.append({"ground_gen": ground_gen, "desc_gen": desc_gen, "side": side, "image_tokens": patches // 4, "prefix": prefix, "mix": mix.name,
                         "tflop": total / 1e12, "flop_ips": flop_ips, "roof_ips": roof_ips,
                         "gpus_per_million_per_hour": 1e6 / 3600 / min(flop_ips, roof_ips)})
    return rows


def training_row(config, pc, model, processor, tok, peak: float) -> dict:
    from iqa_spider.config.loader import load_config
    from iqa_spider.config.schemas import TrainConfig
    from iqa_spider.train.preprocess import chat

    tcfg = load_config(TrainConfig, gpu.TRAIN_YAML, ["data.uri=/tmp/unused", "output.uri=/tmp/unused"])
    n_lora = lora_params(model, tcfg)
    image = gpu.synthetic_images(1, IMAGE_SIDES[0])[0]
    rows_tokens, patches = [], 0
    for _task, question, answer in gpu.TRAIN_SAMPLES:  # one sample of each task kind, as a micro-batch
        text = processor.apply_chat_template(chat(question, answer), tokenize=False)
        enc = processor(text=[text], images=[image], return_tensors="np")
        rows_tokens.append(int(enc["input_ids"].shape[1]))
        patches = int(enc["image_grid_thw"][0].prod())
    fl = gpu.train_flops(config, pc, n_lora, rows_tokens, patches, sum(rows_tokens))
    per_token = fl["model"] / fl["tokens"]
    tokens_per_s = peak / per_token
    return {"lora_params": n_lora, "tokens_per_sample": fl["tokens"] / len(rows_tokens),
            "tflop_per_sample": fl["model"] / len(rows_tokens) / 1e12, "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s / (fl["tokens"] / len(rows_tokens)),
            "hfu_over_mfu": (fl["model"] + fl["recompute"]) / fl["model"], "steps": tcfg.optim.max_steps,
            "global_batch": tcfg.optim.global_batch_size}


def render(args, rows: list[dict], train: dict) -> str:
    lines = [f"Ceilings of the Qwen2.5-VL-7B-sized model ({args.params / 1e9:.2f} B parameters) at {args.peak_tflops:g} TFLOP/s bf16 and "
             f"{args.bandwidth_tbs:g} TB/s per GPU (spec rates, not measured), decoding batch {args.batch}. "
             "GPUs per million images an hour are at the ceiling: divide by the measured fraction "
             "(bench/gpu.py) for a real count.", "",
             f"Answers: {rows[0]['ground_gen']} tokens for grounding, {rows[0]['desc_gen']} for a global "
             "description (a typical annotation answer and its end token, counted by the project's tokenizer; "
             "Qwen's splits English within a few tokens of it).", "",
             "| image | image tokens | task mix | TFLOP / image | FLOP ceiling images/s | roofline images/s "
             "| GPUs for 1 M images/h at the ceiling |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['side']}x{r['side']} | {r['image_tokens']} | {r['mix']} | {r['tflop']:.2f} | "
                     f"{r['flop_ips']:.0f} | {r['roof_ips']:.0f} | {r['gpus_per_million_per_hour']:.1f} |")
    t = train
    lines += ["", f"Training (the 7B LoRA ZeRO-3 recipe, r 64: {t['lora_params'] / 1e6:.0f} M LoRA parameters; "
              f"448x448 images, {t['tokens_per_sample']:.0f} tokens per sample on average over the four task "
              f"kinds, {t['tflop_per_sample']:.1f} TFLOP of model FLOPs per sample): at MFU 100 % one GPU does "
              f"{t['tokens_per_s']:,.0f} tokens/s = {t['samples_per_s']:.0f} samples/s, an {NODE_GPUS}-GPU node "
              f"{NODE_GPUS * t['samples_per_s']:.0f} samples/s; the recipe's {t['steps']} steps of "
              f"{t['global_batch']} samples take {t['steps'] * t['global_batch'] / (NODE_GPUS * t['samples_per_s']) / 60:.1f} "
              f"min on one node at that ceiling. Gradient checkpointing makes the hardware do "
              f"{t['hfu_over_mfu']:.2f}x the model FLOPs (HFU/MFU)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="dense bf16 peak per GPU")
    ap.add_argument("--bandwidth-tbs", type=float, default=H200_HBM_TBS, help="memory bandwidth per GPU")
    ap.add_argument("--batch", type=int, default=32, help="images decoded together (infer.batch_size)")
    ap.add_argument("--md", default=None, help="also write the tables to this file")
    args = ap.parse_args(argv)
    config, processor, tok, _ = gpu.config_and_processor(toy=False)
    model = meta_model(config)
    pc = gpu.param_counts(model)
    args.params = pc["total"]
    peak, bw = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    text = render(args, inference_rows(config, pc, processor, tok, peak, bw, args.batch),
                  training_row(config, pc, model, processor, tok, peak))
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
