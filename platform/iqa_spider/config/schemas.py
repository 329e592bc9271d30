"""The structured configs: one dataclass per job, built from shared sections.

A job's YAML names its kind in `job:`; `JOB_SCHEMAS` maps that name to the dataclass, so
`iqa-spider config show --config FILE` can validate any file without being told its kind.
Enumerated fields are checked in __post_init__ so a typo fails at start, naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from iqa_spider.config.loader import ConfigError, ConfigValueError, check_at_least, check_choice, load_config, read_yaml
from iqa_spider.vocab import DISTORTION_FAMILIES

MODEL_FAMILIES = ("qwen2_5_vl", "qwen3_vl")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_SIZES = ("tiny", "small")  # the presets of iqa_spider.model.tiny (kept here: no torch at config load)


@dataclass
class ModelConfig:
    """Which checkpoint and how to place it. Shared by every job that loads the model."""

    family: str = "qwen2_5_vl"
    # A local HF directory, a hub id (when the hub is reachable) or an MLflow URI
    # (models:/iqa-spider@champion, models:/iqa-spider/3, runs:/<id>/model).
    path: str = MISSING
    # The MLflow server that models:/ and runs:/ paths are read from; null: MLFLOW_TRACKING_URI.
    tracking_uri: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"
    # Bounds on the image processor's resize, in pixels; null keeps the checkpoint's own.
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        check_choice("model.family", self.family, MODEL_FAMILIES)
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class TinyModelConfig:
    """How `model init-tiny` builds the project's own random-initialised model."""

    # null: the size's own class (iqa_spider.model.tiny.DEFAULT_FAMILY: tiny qwen2_5_vl, small qwen3_vl)
    family: str | None = None
    seed: int = 0
    # tiny: fast tests (learns templates only); small: learns from the image on 2 cores.
    size: str = "small"

    def __post_init__(self) -> None:
        if self.family is not None:
            check_choice("tiny.family", self.family, MODEL_FAMILIES)
        check_choice("tiny.size", self.size, MODEL_SIZES)


@dataclass
class DemoStages:
    """The shipped job configs the demo chains, each with the overrides that keep it small.

    Paths are relative to the repository root. Inputs and outputs (URIs, model path, MLflow)
    are filled in by the demo so that every stage reads what the previous one wrote.
    """

    annotate: str = "configs/annotate.yaml"
    annotate_overrides: list[str] = field(default_factory=lambda: ["distort.max_side=224", "test_fraction=0.3"])
    train: str = "configs/train/tiny_cpu.yaml"
    train_overrides: list[str] = field(default_factory=list)
    evaluate: str = "configs/evaluate.yaml"
    evaluate_overrides: list[str] = field(default_factory=list)
    promote: str = "configs/gate.yaml"
    promote_overrides: list[str] = field(default_factory=list)
    score: str = "configs/score.yaml"
    score_overrides: list[str] = field(default_factory=lambda: ["output.overlays=true"])


@dataclass
class DemoConfig:
    """`make demo`: the main job end to end on embedded defaults."""

    job: str = "demo"
    workdir: str = "demo_out"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    stages: DemoStages = field(default_factory=DemoStages)


@dataclass
class ModelRecipe:
    """A model recipe file on its own (configs/model/*.yaml)."""

    job: str = "model"
    model: ModelConfig = field(default_factory=ModelConfig)


REGION_METHODS = ("superpixel", "masks", "sam", "grid")


# Why the annotation job skips a source (its shard summary counts them): decode_image's
# ImageError reasons, no usable region, unreadable after retries, failed (an unexpected error).
ANNOTATE_SKIP_REASONS = ("empty", "not_an_image", "corrupt", "too_many_pixels", "no_regions", "unreadable",
                         "failed")


@dataclass
class AnnotateInput:
    # A folder or prefix of images (local, file://, s3://), or a Parquet manifest with an
    # `image_uri` column and optionally `masks` (list of {mask_rle, label}) for method=masks.
    uri: str = MISSING
    max_pixels: int = 64_000_000  # larger images are skipped as too_many_pixels
    read_retries: int = 4         # attempts per source on top of botocore's own retries
    # Skip reasons for which a re-run annotates a finished shard again, e.g. [unreadable]
    # after an S3 outage. Empty: finished shards are final.
    retry_skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_at_least(1, ("input.read_retries", self.read_retries))
        for r in self.retry_skipped:
            check_choice("input.retry_skipped", r, ANNOTATE_SKIP_REASONS)


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
    sam_path: str | None = None  # a local SAM checkpoint directory, for method=sam
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
    # Pristine views per source: the first is the whole photo, the others random square-ish
    # crops (a side between view_min_side and 1.0 of the photo's) shrunk to max_side, each
    # with its own regions and variants. More distinct content from the same few photos; the
    # split stays by source, so no view of a test photo is trained on.
    views_per_image: int = 1
    view_min_side: float = 0.4
    # Severities are drawn uniformly from min_severity..5. Above 1 it makes a curriculum's
    # first, easier dataset (strong damage only); the default 1 is the paper's full range.
    min_severity: int = 1
    # The distortion families drawn, uniformly; null: all of vocab.DISTORTION_FAMILIES. A subset
    # makes a narrower dataset: the families a user's own pipeline produces, or an easier first one.
    families: list[str] | None = None

    @property
    def family_set(self) -> tuple[str, ...]:
        return tuple(self.families) if self.families is not None else DISTORTION_FAMILIES

    def __post_init__(self) -> None:
        check_at_least(1, ("distort.views_per_image", self.views_per_image),
                       ("distort.variants_per_image", self.variants_per_image))
        if not 0.0 < self.view_min_side <= 1.0:
            raise ConfigValueError("distort.view_min_side", "must be in (0, 1]")
        for key in ("whole_image_prob", "dao_prob", "clean_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigValueError(f"distort.{key}", f"must be a probability in [0, 1], got {getattr(self, key)}")
        # Both are shares of all variants (clean is drawn first, whole-image next, the rest is local)
        if self.clean_prob + self.whole_image_prob > 1.0 + 1e-9:
            raise ConfigValueError("distort.whole_image_prob",
                                   f"clean_prob + whole_image_prob must be at most 1 (shares of all variants), got "
                                   f"{self.clean_prob} + {self.whole_image_prob}; for no local damage set "
                                   f"whole_image_prob={1 - self.clean_prob:g}")
        if isinstance(self.min_severity, bool) or self.min_severity not in (1, 2, 3, 4, 5):
            raise ConfigValueError("distort.min_severity", f"must be an int in 1..5, got {self.min_severity!r}")
        if self.families is not None:
            unknown = [f for f in self.families if f not in DISTORTION_FAMILIES]
            if unknown or not self.families or len(set(self.families)) < len(self.families):
                raise ConfigValueError("distort.families", f"must be distinct names among {list(DISTORTION_FAMILIES)} "
                                       f"(or null for all), got {list(self.families)!r}")


@dataclass
class TaskMix:
    local_per_image: int = 2
    referring_per_image: int = 2


@dataclass
class RewriteConfig:
    enabled: bool = False
    model_path: str | None = None  # a local HF instruct model directory
    max_new_tokens: int = 96


@dataclass
class RayConfig:
    address: str | None = None   # null: connect to RAY_ADDRESS if set, else start a local Ray
    num_cpus: int | None = None  # CPUs of a local Ray (null: all)


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


TASK_NAMES = ("global_desc", "local_desc", "grounding", "referring_short", "referring_long", "rating")


def _default_task_weights() -> dict[str, float]:
    return {t: 1.0 for t in TASK_NAMES}


@dataclass
class TrainData:
    uri: str = MISSING                 # dataset in the contract (folder of Parquet shards, any URI)
    split: str = "train"
    # Relative share of each task in the training stream (resampled to these proportions).
    task_weights: dict[str, float] = field(default_factory=_default_task_weights)
    max_seq_len: int = 1024            # longer samples are cut in the answer, never in the image
    shuffle_buffer: int = 256          # rows in each worker's local shuffle buffer
    max_pixels: int = 64_000_000       # decoded-image limit, as everywhere


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Linear layers of the *language model* that get LoRA (matched under the language model only).
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_vision: bool = True          # the paper trains the vision tower fully
    train_merger: bool = True          # and the projector/merger


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 3
    precision: str = "auto"            # auto: bf16 on GPU, fp32 on CPU
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    # Parameters with fewer elements stay whole on every rank (DeepSpeed default 1e5); 0
    # partitions every parameter.
    param_persistence_threshold: int = 100_000
    reduce_bucket_size: int = 50_000_000
    prefetch_bucket_size: int = 50_000_000

    def __post_init__(self) -> None:
        check_choice("deepspeed.zero_stage", self.zero_stage, (2, 3))
        check_choice("deepspeed.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))


@dataclass
class OptimSettings:
    lr: float = 1e-4                   # LoRA and trained modules
    vision_lr: float | None = None  # vision tower + merger (null: same as lr)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_steps: int = 100
    micro_batch_size: int = 1          # per worker, per forward
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, must equal micro * accum * workers
    grad_clip: float = 1.0
    seed: int = 0
    # Loss weight of the answer tokens that carry content (distortion, level and position
    # words) against template tokens (weight 1). 1.0 is plain SFT; above 1 makes the few
    # tokens that depend on the image count more than the many that only repeat a template.
    content_loss_weight: float = 1.0


@dataclass
class ScalingSettings:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    preprocess_cpus: float = 1.0       # per Ray Data preprocessing actor (decode + processor)
    preprocess_actors: int = 2         # the most preprocessing actors; raise it until GPUs never wait
    max_failures: int = 2              # worker-group restarts from the latest checkpoint


@dataclass
class CheckpointSettings:
    every_steps: int = 10
    keep: int = 2
    resume_from: str | None = None  # a checkpoint URI of an earlier run to continue from


@dataclass
class TrackingSettings:
    uri: str | None = None          # null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "iqa-spider-train"
    registered_model: str = "iqa-spider"
    register: bool = True
    log_every: int = 1                 # steps between MLflow metric points (sent in the background)
    report_every: int = 20             # steps between ray.train.report calls (each syncs all workers)


@dataclass
class TrainOutput:
    uri: str = MISSING                 # run storage: checkpoints and the exported model (any URI)
    run_name: str | None = None     # null: derived from the config hash (same config -> same run)


TRAIN_METHODS = ("lora", "full")


@dataclass
class TrainConfig:
    job: str = "train"
    # lora: the paper's recipe (LoRA on the language model, vision tower and merger fully).
    # full: every parameter trained (Q-Align / DeQA-Score on 7B; the only choice for a model
    # trained from random init, where LoRA has nothing to adapt). `lora.*` is ignored for full.
    method: str = "lora"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: TrainData = field(default_factory=TrainData)
    lora: LoraSettings = field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    output: TrainOutput = field(default_factory=TrainOutput)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_choice("method", self.method, TRAIN_METHODS)
        o, s = self.optim, self.scaling
        if o.content_loss_weight <= 0:
            raise ConfigValueError("optim.content_loss_weight", "must be > 0")
        check_at_least(1, ("optim.micro_batch_size", o.micro_batch_size), ("optim.grad_accum", o.grad_accum),
                       ("optim.max_steps", o.max_steps), ("scaling.num_workers", s.num_workers),
                       ("checkpoint.every_steps", self.checkpoint.every_steps))
        per_step = o.micro_batch_size * o.grad_accum * s.num_workers
        if o.global_batch_size is not None and o.global_batch_size != per_step:
            raise ConfigValueError(
                "optim.global_batch_size",
                f"{o.global_batch_size} is not micro_batch_size x grad_accum x num_workers = "
                f"{o.micro_batch_size} x {o.grad_accum} x {s.num_workers} = {per_step}")
        unknown = sorted(set(self.data.task_weights) - set(TASK_NAMES))
        if unknown:
            raise ConfigValueError("data.task_weights", f"unknown task(s) {unknown}; tasks are {TASK_NAMES}")
        if any(w < 0 for w in self.data.task_weights.values()) or not any(self.data.task_weights.values()):
            raise ConfigValueError("data.task_weights", "weights must be >= 0 and not all 0")


JOB_SCHEMAS: dict[str, type] = {
    "demo": DemoConfig,
    "model": ModelRecipe,
    "annotate": AnnotateConfig,
    "train": TrainConfig,
}
# Schemas that live beside their job (they import this module, so they register lazily).
LAZY_JOB_SCHEMAS: dict[str, str] = {
    "evaluate": "iqa_spider.evaluate.config:EvaluateConfig",
    "promote": "iqa_spider.registry.config:PromoteConfig",
    "serve": "iqa_spider.serve.config:ServeAppConfig",
    "score": "iqa_spider.score.config:ScoreConfig",
}


def job_schema(kind: str) -> type | None:
    if kind in JOB_SCHEMAS:
        return JOB_SCHEMAS[kind]
    if kind in LAZY_JOB_SCHEMAS:
        import importlib

        module, name = LAZY_JOB_SCHEMAS[kind].split(":")
        return getattr(importlib.import_module(module), name)
    return None


def load_job_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> object:
    """Load any job's YAML by the kind named in its `job:` key."""
    node = read_yaml(Path(path).resolve())
    kind = node.get("job")
    schema = job_schema(kind) if isinstance(kind, str) else None
    if schema is None:
        raise ConfigError(f"must name one of {', '.join([*JOB_SCHEMAS, *LAZY_JOB_SCHEMAS])}, got {kind!r}",
                          key="job", source=str(path))
    return load_config(schema, path, overrides)
