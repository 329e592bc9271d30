"""The two training recipes, and the DeepSpeed config built from ours.

- ``method: lora`` (the paper's): LoRA on the language model's linear layers only; the vision
  tower and its merger / projector are trained fully; everything else (embeddings, norms, LM
  head) is frozen.
- ``method: full`` (Q-Align / DeQA-Score): every parameter is trained. LoRA adapts a model
  that already knows its task; a model trained from random init (the project's tiny one, or
  any new architecture) has nothing for a low-rank update to adapt, so it needs this.
"""
from __future__ import annotations

import re
from typing import Any

from iqa_spider.config.schemas import TrainConfig

# Vision towers of Qwen2.5-VL and Qwen3-VL live under ".visual."; their mergers under these names.
VISION_PREFIX = "visual."
MERGER_PATTERN = re.compile(r"\.visual\.(merger|deepstack_merger_list)\.")


def lora_target_regex(modules: list[str]) -> str:
    """Match the listed linear layers under the language model only (the vision MLP shares names)."""
    return rf".*language_model\..*\.({'|'.join(map(re.escape, modules))})$"


def apply_recipe(model: Any, cfg: TrainConfig) -> tuple[Any, list[dict]]:
    """Set what trains for ``cfg.method``; return (model, optimizer param groups)."""
    if cfg.method == "full":
        return model, full_param_groups(model, cfg)
    return apply_lora(model, cfg)


def full_param_groups(model: Any, cfg: TrainConfig) -> list[dict]:
    """Full fine-tuning: no PEFT wrapping, every parameter trainable, two learning rates.

    "language" (embeddings, LM layers, norms, lm_head) at ``optim.lr``; "vision" (the
    ``visual.`` tower and its merger) at ``optim.vision_lr``: the pre-trained ViT is usually
    moved more gently than the language model (null: the same rate).
    """
    language, vision = [], []
    for name, param in model.named_parameters():  # tied weights (embeddings = lm_head) come once
        param.requires_grad_(True)
        (vision if is_vision(name) else language).append(param)
    groups = [{"params": language, "lr": cfg.optim.lr, "name": "language"}]
    if vision:
        groups.append({"params": vision, "lr": cfg.optim.vision_lr or cfg.optim.lr, "name": "vision"})
    return groups


def apply_lora(model: Any, cfg: TrainConfig) -> tuple[Any, list[dict]]:
    """Wrap with LoRA, unfreeze the vision parts the config names; return (model, param groups)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(**lora_config_dict(cfg)))
    vision, other = [], []
    for name, param in model.named_parameters():
        if trains_fully(name, cfg):
            param.requires_grad_(True)
        if param.requires_grad:
            (vision if is_vision(name) else other).append(param)
    groups = [{"params": other, "lr": cfg.optim.lr, "name": "lora"}]
    if vision:
        groups.append({"params": vision, "lr": cfg.optim.vision_lr or cfg.optim.lr, "name": "vision"})
    return model, groups


def is_vision(name: str) -> bool:
    return f".{VISION_PREFIX}" in f".{name}"


def trains_fully(name: str, cfg: TrainConfig) -> bool:
    """Whether the recipe trains this (non-LoRA) parameter fully: the merger, the vision tower."""
    if MERGER_PATTERN.search(f".{name}."):
        return cfg.lora.train_merger
    return is_vision(name) and cfg.lora.train_vision


def torch_dtype(prec: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)


def lora_config_dict(cfg: TrainConfig) -> dict:
    return {"r": cfg.lora.r, "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout,
            "target_modules": lora_target_regex(list(cfg.lora.target_modules)), "bias": "none"}


def precision(cfg: TrainConfig, on_gpu: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if on_gpu else "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    o, d = cfg.optim, cfg.deepspeed
    prec = precision(cfg, on_gpu)
    zero: dict[str, Any] = {
        "stage": d.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": d.reduce_bucket_size,
    }
    if d.zero_stage == 3:
        zero.update({
            # Gather the full weights on rank 0 when exporting (save_16bit_model).
            "stage3_gather_16bit_weights_on_model_save": True,
            # Parameters smaller than this stay whole on every rank (DeepSpeed's trade of
            # memory for fewer gathers); 0 partitions everything.
            "stage3_param_persistence_threshold": d.param_persistence_threshold,
            "stage3_prefetch_bucket_size": d.prefetch_bucket_size,
        })
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if d.offload_params and d.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        # torch's AdamW on GPU too: DeepSpeed's FusedAdam is compiled with nvcc at first use
        # (minutes per worker, since the wheel ships no prebuilt ops) for little gain with LoRA's
        # few trainable parameters, and torch's multi-tensor AdamW is close to it for full
        # fine-tuning. CPU offload needs DeepSpeed's own CPU Adam (compiled at first use).
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "weight_decay": o.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "torch_adam": not d.offload_optimizer}},
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": o.max_steps, "warmup_num_steps": min(o.warmup_steps, o.max_steps - 1) if o.max_steps > 1 else 0,
            "warmup_type": "linear", "cos_min_ratio": 0.1}},
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
