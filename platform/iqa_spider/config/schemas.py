"""The structured configs: one dataclass per job, built from shared sections.

A job's YAML names its kind in `job:`; `JOB_SCHEMAS` maps that name to the dataclass, so
`iqa-spider config show --config FILE` can validate any file without being told its kind.
Enumerated fields are checked in __post_init__ so a typo fails at start, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from iqa_spider.config.loader import ConfigError, check_choice, load_config, read_yaml

MODEL_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Which checkpoint and how to place it. Shared by every job that loads the model."""

    family: str = "qwen2_5_vl"
    # A local HF directory, a hub id (when the hub is reachable) or an MLflow URI
    # (models:/iqa-spider@champion, models:/iqa-spider/3, runs:/<id>/model).
    path: str = MISSING
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"
    # Bounds on the image processor's resize, in pixels; null keeps the checkpoint's own.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None

    def __post_init__(self) -> None:
        check_choice("model.family", self.family, MODEL_FAMILIES)
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class TinyModelConfig:
    """How `model init-tiny` builds the project's own random-initialised model."""

    family: str = "qwen2_5_vl"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("tiny.family", self.family, MODEL_FAMILIES)


@dataclass
class DemoConfig:
    """`make demo`: the main job end to end on embedded defaults."""

    job: str = "demo"
    workdir: str = "demo_out"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class ModelRecipe:
    """A model recipe file on its own (configs/model/*.yaml)."""

    job: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)


JOB_SCHEMAS: dict[str, type] = {
    "demo": DemoConfig,
    "model": ModelRecipe,
}


def load_job_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> object:
    """Load any job's YAML by the kind named in its `job:` key."""
    node = read_yaml(Path(path).resolve())
    kind = node.get("job")
    if kind not in JOB_SCHEMAS:
        raise ConfigError(f"must name one of {', '.join(JOB_SCHEMAS)}, got {kind!r}",
                          key="job", source=str(path))
    return load_config(JOB_SCHEMAS[kind], path, overrides)
