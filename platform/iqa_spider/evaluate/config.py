"""Structured config of the evaluation job (configs/evaluate.yaml).

Same style as :mod:`iqa_spider.config.schemas`: plain dataclasses loaded by OmegaConf, with
enumerated fields checked in ``__post_init__`` so a typo fails at start naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from iqa_spider.config.loader import ConfigValueError, check_choice, parse_bool
from iqa_spider.config.schemas import ModelConfig
from iqa_spider.data.schema import TASKS
from iqa_spider.infer.config import MAPPING_NAMES, InferConfig, SegmenterConfig


@dataclass
class EvalData:
    uri: str = MISSING                # a dataset in the contract (folder of shards or one .parquet)
    split: str = "test"               # test | train | all
    tasks: list[str] = field(default_factory=lambda: [
        "rating", "grounding", "referring_short", "referring_long", "global_desc", "local_desc"])
    max_images: int | None = None  # evaluate at most this many images (first by image_id)
    # The shuffled-image control: every sample is asked about another sample's image (a
    # permutation of the images across image_ids with no fixed points, from `shuffle_seed`,
    # donors from another source photo where the split allows), truth kept. A model whose
    # metrics equal the control's does not use the image.
    shuffle_images: bool = False
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        check_choice("data.split", self.split, ("test", "train", "all"))

        for t in self.tasks:
            check_choice("data.tasks", t, TASKS)


@dataclass
class EvalOutput:
    uri: str | None = None         # report folder: report.json, predictions.parquet, report.html
    html: bool = True
    html_max_items: int = 24          # grounding samples drawn in the HTML page
    plots: bool = True                # PNG plots (matplotlib) beside report.html, logged to MLflow too


@dataclass
class EvalMlflow:
    # auto: log when MLFLOW_TRACKING_URI is set; true: always (./mlflow.db if unset, artifacts
    # beside it in ./mlartifacts); false: never
    enabled: str = "auto"
    experiment: str = "iqa-spider-evaluate"
    run_name: str | None = None

    def __post_init__(self) -> None:
        # auto, or a boolean (YAML's true/false arrive as "True"/"False"), kept as its word
        if str(self.enabled).strip().lower() == "auto":
            self.enabled = "auto"
            return
        try:
            self.enabled = str(parse_bool(self.enabled, "mlflow.enabled")).lower()
        except ConfigValueError:
            raise ConfigValueError("mlflow.enabled", f"expected auto, true or false, got {self.enabled!r}") from None


@dataclass
class EvaluateConfig:
    job: str = "evaluate"
    model: ModelConfig = field(default_factory=ModelConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    data: EvalData = field(default_factory=EvalData)
    output: EvalOutput = field(default_factory=EvalOutput)
    mlflow: EvalMlflow = field(default_factory=EvalMlflow)
    # Mappings whose point accuracy / mIoU are reported next to the configured one (empty: all).
    mappings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for m in self.mappings:
            check_choice("mappings", m, MAPPING_NAMES)


__all__ = ["EvaluateConfig", "EvalData", "EvalOutput", "EvalMlflow"]
