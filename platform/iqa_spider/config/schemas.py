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

from iqa_spider.config.loader import ConfigError, ConfigValueError, check_choice, load_config, read_yaml

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


REGION_METHODS = ("superpixel", "masks", "sam")


@dataclass
class AnnotateInput:
    # A folder or prefix of images (local, file://, s3://), or a Parquet manifest with an
    # `image_uri` column and optionally `masks` (list of {mask_rle, label}) for method=masks.
    uri: str = MISSING
    max_pixels: int = 64_000_000  # larger images are skipped as too_many_pixels


@dataclass
class AnnotateOutput:
    uri: str = MISSING
    shard_size: int = 16          # source images per Parquet shard (and per Ray task)
    embed_images: bool = False    # put image bytes in the rows instead of image files + image_uri


@dataclass
class RegionConfig:
    method: str = "superpixel"
    min_regions: int = 3
    max_regions: int = 12
    min_area_frac: float = 0.04
    sam_path: Optional[str] = None  # a local SAM checkpoint directory, for method=sam
    grid: int = 2                   # position vocabulary: 2 (paper) or 3 (3x3)

    def __post_init__(self) -> None:
        check_choice("regions.method", self.method, REGION_METHODS)
        check_choice("regions.grid", self.grid, (2, 3))
        if self.method == "sam" and not self.sam_path:
            raise ConfigValueError("regions.sam_path", "method sam needs a SAM checkpoint path")


@dataclass
class DistortConfig:
    max_side: int = 512             # pristine images are shrunk to this longer side first
    variants_per_image: int = 2     # distorted versions made from each pristine image
    max_regions_distorted: int = 2
    whole_image_prob: float = 0.15  # a variant distorted as a whole instead of by region
    dao_prob: float = 0.3           # a distorted region gets a two-step accumulation chain
    clean_prob: float = 0.05        # a variant left undistorted (quality excellent)
    feather_px: float = 3.0


@dataclass
class TaskMix:
    local_per_image: int = 2
    referring_per_image: int = 2


@dataclass
class RewriteConfig:
    enabled: bool = False
    model_path: Optional[str] = None  # a local HF instruct model directory
    max_new_tokens: int = 96


@dataclass
class RayConfig:
    address: Optional[str] = None   # null: connect to RAY_ADDRESS if set, else start a local Ray
    num_cpus: Optional[int] = None  # CPUs of a local Ray (null: all)


@dataclass
class AnnotateConfig:
    job: str = "annotate"
    input: AnnotateInput = field(default_factory=AnnotateInput)
    output: AnnotateOutput = field(default_factory=AnnotateOutput)
    regions: RegionConfig = field(default_factory=RegionConfig)
    distort: DistortConfig = field(default_factory=DistortConfig)
    tasks: TaskMix = field(default_factory=TaskMix)
    rewrite: RewriteConfig = field(default_factory=RewriteConfig)
    test_fraction: float = 0.1
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)


JOB_SCHEMAS: dict[str, type] = {
    "demo": DemoConfig,
    "model": ModelRecipe,
    "annotate": AnnotateConfig,
}


def load_job_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> object:
    """Load any job's YAML by the kind named in its `job:` key."""
    node = read_yaml(Path(path).resolve())
    kind = node.get("job")
    if kind not in JOB_SCHEMAS:
        raise ConfigError(f"must name one of {', '.join(JOB_SCHEMAS)}, got {kind!r}",
                          key="job", source=str(path))
    return load_config(JOB_SCHEMAS[kind], path, overrides)
