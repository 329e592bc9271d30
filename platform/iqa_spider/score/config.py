"""Structured config of the batch scoring job (``job: score``, configs/score.yaml).

Reuses the shared sections: ``ModelConfig`` (default ``models:/iqa-spider@champion``),
``InferConfig`` and ``SegmenterConfig`` of the inference engine, ``RayConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from iqa_spider.config.loader import ConfigValueError, check_at_least, check_choice
from iqa_spider.config.schemas import ModelConfig, RayConfig
from iqa_spider.infer.config import InferConfig, SegmenterConfig

TASKS = ("score", "ground", "describe")
# Every `reason` a result row's error can start with (iqa_spider.images' ImageError reasons,
# then the job's own).
ERROR_REASONS = ("empty", "not_an_image", "corrupt", "too_many_pixels", "bad_aspect_ratio", "unreadable",
                 "inference_failed")
BACKENDS = ("actors", "serve")
CRASH_ENV = "IQA_SPIDER_SCORE_CRASH_ONCE"  # test hook: a marker path; the first scoring call that
                                           # finds it absent creates it and kills its actor mid-batch,
                                           # and the first read task that finds <marker>.read absent
                                           # kills its worker


def _default_model() -> ModelConfig:
    return ModelConfig(path="models:/iqa-spider@champion")


@dataclass
class ScoreInput:
    uri: str = MISSING              # folder / prefix (local, file://, s3://), walked recursively
    # Files without an image suffix are sniffed (first 16 bytes) and scored if they are images.
    sniff_unknown: bool = True
    read_retries: int = 4           # attempts per object on top of botocore's own retries
    retry_backoff_s: float = 0.5    # first wait; doubles each attempt (with jitter)
    # Error reasons whose rows a re-run takes out of the output and scores again, e.g.
    # [unreadable, inference_failed] after an S3 outage or a GPU failure. Empty: errors are final.
    retry_errors: list[str] = field(default_factory=list)


@dataclass
class ScoreOutput:
    uri: str = MISSING              # data/*.parquet shards, _summary.json, artifacts
    block_size: int = 64            # input keys per block = per Parquet shard (the retry unit)
    masks: bool = False             # masks/<key>.<k>.png per grounding region
    overlays: bool = False          # overlays/<key>.jpg: image, masks and points
    summary: bool = True            # _summary.json (+ _histogram.png when matplotlib is there)
    html: bool = True               # report.html: counts, histogram, lowest scores, errors (needs summary)


@dataclass
class ScoringSettings:
    actors: int = 1                 # actor pool size (one model per actor)
    num_gpus: float = 0.0           # per actor (1 on GPU nodes)
    num_cpus: float = 1.0           # per actor
    decode_cpus: float = 0.5        # per read + decode task
    decode_memory_mb: int = 256     # reserved per read + decode task (a block of decoded images)
    write_cpus: float = 0.25        # per shard writer task


@dataclass
class ServeBackendSettings:
    app_name: str = "iqa-spider"    # the running Serve application (serving/config.yaml)
    model_deployment: str = "IQAModel"
    grounding_deployment: str = "IQAGrounding"
    clients: int = 2                # Ray Data actors that hold the handles (calls in flight per client: a block)
    timeout_s: float = 300.0        # per image call


@dataclass
class ScoreConfig:
    job: str = "score"
    model: ModelConfig = field(default_factory=_default_model)
    infer: InferConfig = field(default_factory=InferConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    input: ScoreInput = field(default_factory=ScoreInput)
    output: ScoreOutput = field(default_factory=ScoreOutput)
    # What each row holds: score always; ground: one answer + point + mask per
    # infer.ground_questions (HyD-G by default); describe: a global description.
    tasks: list[str] = field(default_factory=lambda: ["score", "ground"])
    backend: str = "actors"         # actors: a model per actor in the job | serve: a running Serve app
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    serve: ServeBackendSettings = field(default_factory=ServeBackendSettings)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        for t in self.tasks:
            check_choice("tasks", t, TASKS)
        for r in self.input.retry_errors:
            check_choice("input.retry_errors", r, ERROR_REASONS)
        if "score" not in self.tasks:
            raise ConfigValueError("tasks", "must include 'score' (every row has a score)")
        check_at_least(1, ("output.block_size", self.output.block_size), ("scoring.actors", self.scoring.actors),
                       ("serve.clients", self.serve.clients), ("input.read_retries", self.input.read_retries),
                       ("scoring.decode_memory_mb", self.scoring.decode_memory_mb))
        if self.scoring.num_gpus < 0 or self.scoring.num_cpus < 0:
            raise ConfigValueError("scoring.num_gpus", "resources must be >= 0")

    @property
    def describe(self) -> bool:
        return "describe" in self.tasks

    @property
    def ground_questions(self) -> list[str]:
        return list(self.infer.ground_questions) if "ground" in self.tasks else []


__all__ = ["ScoreConfig", "ScoreInput", "ScoreOutput", "ScoringSettings", "ServeBackendSettings", "TASKS",
           "BACKENDS", "CRASH_ENV"]
