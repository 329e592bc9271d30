"""Final export: a consolidated HF directory (safetensors) that loads without peft.

``method: lora``: LoRA merged into the base, plus the adapter alone. ``method: full``: the
full trained weights, nothing else (there is no adapter to ship).

The trap this avoids: under ZeRO-3 every rank holds only a shard of each parameter, so a
plain `save_pretrained` writes empty (0-element) tensors (for LoRA: empty adapters). Instead
DeepSpeed gathers the full weights module by module onto rank 0 (`save_16bit_model`, which
keeps the training dtype), rank 0 rebuilds the plain model outside zero.Init, loads them,
checks nothing trainable is missing or empty, merges (LoRA) and saves. The training model's
logits on a fixed input are saved beside the export and compared with the exported model's,
so a bad export fails here, not in production.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from iqa_spider.config.schemas import TrainConfig
from iqa_spider.model.processor import load_processor
from iqa_spider.train.preprocess import chat
from iqa_spider.train.recipe import lora_config_dict, precision, torch_dtype, trains_fully
from iqa_spider.vocab import SCORE_ANSWER_PREFIX, SCORE_QUESTION

log = logging.getLogger(__name__)
HF_DIR, ADAPTER_DIR, REFERENCE_FILE, REPORT_FILE = "hf_model", "adapter", "reference.pt", "export.json"
# fp32 merges are exact up to summation order; bf16 rounds W + BA once more than training.
# A full export is the training weights themselves: only kernel summation order differs.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}


def fixed_input(processor: Any) -> dict:
    """A deterministic input (synthetic image + the scoring prompt) to compare models on."""
    from PIL import Image

    yy, xx = np.mgrid[0:96, 0:128]
    img = np.stack([xx * 2 % 256, yy * 2 % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    text = processor.apply_chat_template(chat(SCORE_QUESTION, SCORE_ANSWER_PREFIX), tokenize=False)
    enc = processor(text=[text], images=[Image.fromarray(img)], return_tensors="pt")
    # mm_token_type_ids (1 on image tokens) too: Qwen3-VL refuses image inputs without them
    keep = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: v for k, v in enc.items() if k in keep}


def export_model(engine: Any, cfg: TrainConfig, out: Path, rank: int, hf_ds: Any) -> None:
    """Collective: every rank calls it. Rank 0 writes OUT/{hf_model, reference.pt, export.json} and,
    for LoRA, OUT/adapter."""
    import torch

    on_gpu = next(engine.module.parameters()).device.type == "cuda"
    prec = precision(cfg, on_gpu)
    # The processor exactly as training used it (the recipe's resize bounds, if any), shipped
    # with the export: inference that keeps "the checkpoint's own" bounds then sees images at
    # the sizes the model was trained on, not the base checkpoint's.
    processor = load_processor(cfg.model.path, cfg.model.min_pixels, cfg.model.max_pixels)
    inputs = fixed_input(processor)
    engine.eval()
    with torch.no_grad():
        dev = {k: v.to(engine.device) for k, v in inputs.items()}
        dev["pixel_values"] = dev["pixel_values"].to(next(engine.module.parameters()).dtype)
        reference = engine(**dev).logits.float().cpu()
    consolidated = out / "_consolidated"
    engine.save_16bit_model(str(consolidated), "state.bin")  # gathers on rank 0 only
    if rank != 0:
        return
    state = torch.load(consolidated / "state.bin", map_location="cpu", weights_only=True)
    shutil.rmtree(consolidated)
    _write_export(cfg, out, state, processor, inputs, reference, prec, hf_ds)


def _write_export(cfg: TrainConfig, out: Path, state: dict, processor: Any, inputs: dict, reference: Any,
                  prec: str, hf_ds: Any) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    if hf_ds is not None:  # build the export model normally, not partitioned by zero.Init
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    dtype = torch_dtype(prec)
    base = AutoModelForImageTextToText.from_pretrained(cfg.model.path, dtype=dtype)
    if cfg.method == "full":
        _load_trained(base, state, {n for n, _ in base.named_parameters()})  # every parameter trained
        exported, counts = base.eval(), {"trained_tensors": sum(1 for _ in base.parameters())}
    else:
        exported, counts = _lora_export(base, cfg, state, out)
    hf = out / HF_DIR
    exported.save_pretrained(hf, safe_serialization=True)
    processor.save_pretrained(hf)
    with torch.no_grad():
        feed = dict(inputs)
        feed["pixel_values"] = feed["pixel_values"].to(dtype)
        logits = exported(**feed).logits.float()
    diff = float((logits - reference).abs().max())
    torch.save({"inputs": inputs, "logits": reference}, out / REFERENCE_FILE)
    report = {"method": cfg.method, "max_abs_logit_diff": diff, "tolerance": TOLERANCE[prec], "precision": prec,
              **counts}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if diff > TOLERANCE[prec]:
        raise RuntimeError(f"exported model disagrees with the trained one: max |logit diff| {diff:.3g} "
                           f"> {TOLERANCE[prec]}")
    log.info("export written: %s (max |logit diff| %.2e)", out, diff)


def _load_trained(model: Any, state: dict, trainable: set[str]) -> None:
    """Load the gathered ``state`` into ``model``; refuse if a trained tensor is missing or empty."""
    empty = [n for n in trainable if n in state and state[n].numel() == 0]
    missing = sorted(n for n in trainable if n not in state)
    if empty or missing:
        raise RuntimeError(f"export lost trained weights: empty {empty[:3]}, missing {missing[:3]}")
    result = model.load_state_dict(state, strict=False)
    real_missing = [k for k in result.missing_keys if k in dict(model.named_parameters())]
    if real_missing:
        raise RuntimeError(f"export: parameters missing from the consolidated state: {real_missing[:5]}")


def _lora_export(base: Any, cfg: TrainConfig, state: dict, out: Path) -> tuple[Any, dict]:
    """LoRA on ``base`` with the trained state; writes OUT/adapter; returns (merged model, counts)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    model = get_peft_model(base, LoraConfig(**lora_config_dict(cfg)))
    _load_trained(model, state, {n for n, _ in model.named_parameters() if "lora_" in n or trains_fully(n, cfg)})
    adapter = out / ADAPTER_DIR
    model.save_pretrained(adapter, safe_serialization=True)
    vision = {n: t.contiguous() for n, t in state.items() if trains_fully(n, cfg)}
    if vision:  # fully trained modules are not part of a LoRA adapter: ship them beside it
        save_file(vision, str(adapter / "trained_modules.safetensors"))
    counts = {"lora_tensors": sum(1 for n in state if "lora_" in n), "vision_tensors": len(vision)}
    return model.merge_and_unload().eval(), counts
