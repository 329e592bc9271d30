"""Sizing ceilings of the 7B model on a GPU, from the FLOP model of bench/gpu.py.

No weights and no GPU: the Qwen2.5-VL-7B-sized model is built on the meta device (shapes
only), token counts come from the real processor, the project's tokenizer and the engine's
own prompt split, and the GPU enters only through its rates (default: H200 SXM spec, 989
TFLOP/s dense bf16, 4.8 TB/s).

For each task mix it prints the images/s one GPU could reach (the FLOP ceiling, and the
roofline ceiling that also bounds each decoding step by reading the weights and the KV cache)
and how many GPUs a million images an hour would take at the roofline; for the training
recipe, tokens/s and samples/s per GPU and per 8-GPU node at MFU 100 %. A ceiling is a lower
bound on GPUs, not a forecast: bench/gpu.py measures which fraction of it the predictor and
the training step reach, against the peak it measures (pass that peak here with
--peak-tflops / --bandwidth-tbs so that both refer to the same rates; docs/scoring.md).

    .venv/bin/python bench/sizing.py [--peak-tflops 989] [--bandwidth-tbs 4.8] [--batch 8] [--md FILE]
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gpu  # bench/gpu.py: the 7B dimensions, the FLOP model, the recipe's files (sets the environment)

H200_BF16_TFLOPS = 989.0  # dense, SXM (NVIDIA's H200 datasheet; 1979 is with 2:4 sparsity)
H200_HBM_TBS = 4.8
NODE_GPUS = 8
SCORE_YAML = gpu.REPO / "configs/score.yaml"
# Images at the 7B recipe's pixel bounds: the smallest (min_pixels: 256 image tokens) and a
# 1 MP photo (1024 x 1024 is cut to max_pixels: 980 x 980, 1225 image tokens).
IMAGE_SIDES = (448, 1024)
MIXES = (("score", False, False), ("score + grounding", True, False),
         ("score + grounding + global description", True, True))


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


def inference_rows(config, pc, model, processor, tok, peak: float, bw: float, batch: int) -> tuple[list[dict], dict]:
    from iqa_spider.infer.config import HYD_QUESTION
    from iqa_spider.infer.engine import Engine, Query
    from iqa_spider.vocab import SCORE_QUESTION

    eng = Engine(model, processor)  # only its prompt split and suffix encoding are used
    describe_question = gpu.TRAIN_SAMPLES[0][1]
    answers = {"ground": answer_tokens(tok, gpu.TRAIN_SAMPLES[1][2]),
               "describe": answer_tokens(tok, gpu.TRAIN_SAMPLES[0][2])}
    questions = {"score": Query(SCORE_QUESTION, mode="score"), "ground": Query(HYD_QUESTION),
                 "describe": Query(describe_question)}
    bytes_per_param = 2  # bf16
    rows = []
    for side in IMAGE_SIDES:
        n = gpu.prompt_tokens(eng, processor, config, gpu.synthetic_images(1, side)[0], questions)
        for name, grounding, describe in MIXES:
            # infer_flops counts score + one grounding answer; score alone has neither the
            # grounding suffix nor its decoding, a description adds its suffix and decoding.
            fl = gpu.infer_flops(config, pc, n["patches"], n["prefix"], n["score"],
                                 n["ground"] if grounding else 0, answers["ground"] if grounding else 0)
            total, decode_flops, decode_s = fl["total"], fl["decode"], 0.0
            if grounding:
                decode_s += gpu.decode_roofline_s(config, pc, batch, n["prefix"] + n["ground"], answers["ground"],
                                                  peak, bw, bytes_per_param) / batch
            if describe:
                desc = gpu.infer_flops(config, pc, n["patches"], n["prefix"], 0, n["describe"], answers["describe"])
                total += desc["suffixes"] + desc["decode"]
                decode_flops += desc["decode"]
                decode_s += gpu.decode_roofline_s(config, pc, batch, n["prefix"] + n["describe"],
                                                  answers["describe"], peak, bw, bytes_per_param) / batch
            flop_ips = peak / total
            roof_ips = 1 / ((total - decode_flops) / peak + decode_s)
            rows.append({"side": side, "image_tokens": n["image_tokens"], "mix": name, "tflop": total / 1e12,
                         "flop_ips": flop_ips, "roof_ips": roof_ips, "gpus_per_million_per_hour": 1e6 / 3600 / roof_ips})
    return rows, answers


def training_figures(config, pc, model, processor, peak: float) -> dict:
    """The recipe's micro-batch (one sample of each task kind) through the training
    preprocessing, as bench/gpu.py times it, and its model FLOPs per token."""
    from iqa_spider.config.loader import load_config
    from iqa_spider.config.schemas import TrainConfig

    tcfg = load_config(TrainConfig, gpu.TRAIN_YAML, ["data.uri=/tmp/unused", "output.uri=/tmp/unused"])
    pad_id = int(config.get_text_config().pad_token_id or 0)
    with tempfile.TemporaryDirectory() as tmp:
        batch = gpu.train_batch(SimpleNamespace(toy=False, side=IMAGE_SIDES[0]), processor, config, tcfg, pad_id,
                                Path(tmp))
    rows_tokens = batch["attention_mask"].sum(1).tolist()
    patches = int(batch["image_grid_thw"][0].prod())
    n_lora = lora_params(model, tcfg)
    fl = gpu.train_flops(config, pc, n_lora, rows_tokens, patches, int(batch["input_ids"].numel()))
    samples = len(rows_tokens)
    tokens_per_s = peak / (fl["model"] / fl["tokens"])
    return {"lora_params": n_lora, "tokens_per_sample": fl["tokens"] / samples,
            "tflop_per_sample": fl["model"] / samples / 1e12, "tokens_per_s": tokens_per_s,
            "samples_per_s": tokens_per_s * samples / fl["tokens"],
            "hfu_over_mfu": (fl["model"] + fl["recompute"]) / fl["model"], "steps": tcfg.optim.max_steps,
            "global_batch": tcfg.optim.global_batch_size}


def render(args, params: float, rows: list[dict], answers: dict, train: dict) -> str:
    lines = [f"Ceilings of the Qwen2.5-VL-7B-sized model ({params / 1e9:.2f} B parameters, bf16) at "
             f"{args.peak_tflops:g} TFLOP/s and {args.bandwidth_tbs:g} TB/s per GPU, decoding "
             f"{args.batch} answers together (`infer.batch_size`). Answers: {answers['ground']} tokens for "
             f"grounding, {answers['describe']} for a global description (typical annotation answers and "
             "their end token, counted by the project's tokenizer). The last column is at the roofline "
             "ceiling: divide it by the measured fraction of the roofline (bench/gpu.py) for a real count.", "",
             "| image | image tokens | task mix | TFLOP / image | FLOP ceiling images/s | roofline images/s "
             "| GPUs for 1 M images/h at the roofline |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['side']}x{r['side']} | {r['image_tokens']} | {r['mix']} | {r['tflop']:.2f} | "
                     f"{r['flop_ips']:.0f} | {r['roof_ips']:.0f} | {r['gpus_per_million_per_hour']:.1f} |")
    t = train
    node_samples = NODE_GPUS * t["samples_per_s"]
    lines += ["", f"Training (the 7B LoRA ZeRO-3 recipe, r 64: {t['lora_params'] / 1e6:.0f} M LoRA parameters; "
              f"448x448 images, {t['tokens_per_sample']:.0f} tokens per sample on average over the four task "
              f"kinds, {t['tflop_per_sample']:.1f} TFLOP of model FLOPs per sample): at MFU 100 % one GPU does "
              f"{t['tokens_per_s']:,.0f} tokens/s = {t['samples_per_s']:.0f} samples/s, an {NODE_GPUS}-GPU node "
              f"{node_samples:.0f} samples/s, so the recipe's {t['steps']} steps of {t['global_batch']} samples "
              f"take {t['steps'] * t['global_batch'] / node_samples:.0f} s on one node; multiply the rates (divide "
              f"the time) by the measured MFU. Gradient checkpointing makes the hardware do "
              f"{t['hfu_over_mfu']:.2f}x the model FLOPs (HFU/MFU)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 matmul peak per GPU")
    ap.add_argument("--bandwidth-tbs", type=float, default=H200_HBM_TBS, help="memory bandwidth per GPU")
    ap.add_argument("--batch", type=int, default=int(yaml.safe_load(SCORE_YAML.read_text())["infer"]["batch_size"]),
                    help="answers decoded together: infer.batch_size (default: configs/score.yaml's)")
    ap.add_argument("--md", default=None, help="also write the tables to this file")
    args = ap.parse_args(argv)
    config, processor, tok = gpu.config_processor_tokenizer(toy=False)
    model = meta_model(config)
    pc = gpu.param_counts(model)
    peak, bw = args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12
    rows, answers = inference_rows(config, pc, model, processor, tok, peak, bw, args.batch)
    text = render(args, pc["total"], rows, answers, training_figures(config, pc, model, processor, peak))
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
