"""The gate file (configs/gate.yaml): the typed schema of the `promote` job.

Kept apart from :mod:`iqa_spider.registry.promotion` so that loading or validating a gate
file imports neither MLflow nor torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iqa_spider.config.loader import ConfigValueError, check_at_least, check_choice
from iqa_spider.config.schemas import ModelConfig
from iqa_spider.evaluate.config import EvalData
from iqa_spider.infer.config import InferConfig, SegmenterConfig

DIRECTIONS = ("higher", "lower")
EVALUATED_PATH = "models:/<registered_model>/<version>"  # model.path is set per evaluated version


@dataclass
class GateMetric:
    """One gate check on a flattened harness metric (e.g. `rating.srcc`, `grounding.all.miou`).

    Against a champion the candidate may be worse by at most `tolerance` (higher: cand >=
    champ - tolerance; lower: cand <= champ + tolerance). `floor` is an absolute bound the
    candidate must always meet (higher: cand >= floor; lower: cand <= floor); it is what
    decides when there is no champion yet. `above_chance` is a floor relative to the chance
    figure the evaluation reports beside the metric on the same data (majority answer,
    uniform random point, 0 for a correlation): the candidate must beat it by this margin,
    always. A missing or non-finite candidate value fails.
    """

    name: str = ""
    direction: str = "higher"
    tolerance: float = 0.0
    floor: float | None = None
    above_chance: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigValueError("gate.name", "every gate metric needs a name (a flattened harness metric)")
        check_choice(f"gate[{self.name}].direction", self.direction, DIRECTIONS)
        if self.tolerance < 0:
            raise ConfigValueError(f"gate[{self.name}].tolerance", "must be >= 0")
        if self.above_chance is not None and self.direction != "higher":
            raise ConfigValueError(f"gate[{self.name}].above_chance", "only for metrics where higher is better")


def _default_gate() -> list[GateMetric]:
    return [GateMetric("rating.srcc", "higher", 0.02, 0.0), GateMetric("rating.plcc", "higher", 0.02, 0.0),
            GateMetric("grounding.all.miou", "higher", 0.01, 0.0),
            GateMetric("referring_short.type_f1", "higher", 0.02, 0.0)]


@dataclass
class PromotionLockSettings:
    ttl_s: float = 600.0      # a lease older than this is taken for a crashed holder and broken
    wait_s: float = 1800.0    # give up (error) after waiting this long for another promotion
    poll_s: float = 1.0       # between tries (with jitter)


@dataclass
class PromotionTracking:
    uri: str | None = None          # null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "iqa-spider-promotion"


@dataclass
class PromoteConfig:
    job: str = "promote"
    registered_model: str = "iqa-spider"
    candidate: str | None = None    # the version to promote (--candidate)
    # How both models are evaluated (same sections as configs/evaluate.yaml; model.path is
    # replaced by models:/<registered_model>/<version> for each evaluated version).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path=EVALUATED_PATH))
    infer: InferConfig = field(default_factory=InferConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    data: EvalData = field(default_factory=EvalData)   # data.uri: --eval-data
    mappings: list[str] = field(default_factory=list)  # extra mappings evaluated (empty: all)
    gate: list[GateMetric] = field(default_factory=_default_gate)
    # If the champion moved while we evaluated, evaluate the new one and decide again, at most
    # this many times in all; then refuse.
    max_attempts: int = 3
    lock: PromotionLockSettings = field(default_factory=PromotionLockSettings)
    tracking: PromotionTracking = field(default_factory=PromotionTracking)

    def __post_init__(self) -> None:
        if not self.gate:
            raise ConfigValueError("gate", "needs at least one metric")
        names = [g.name for g in self.gate]
        if len(set(names)) != len(names):
            raise ConfigValueError("gate", f"metric listed twice: {sorted(n for n in names if names.count(n) > 1)[0]}")
        if self.candidate is not None and not str(self.candidate).isdigit():
            raise ConfigValueError("candidate", f"must be a version number, got {self.candidate!r}")
        check_at_least(1, ("max_attempts", self.max_attempts))
        if self.data.shuffle_images:
            # The control answers about the wrong images: a gate on it would promote on noise.
            raise ConfigValueError("data.shuffle_images", "the shuffled-image control cannot gate a promotion")


__all__ = ["GateMetric", "PromoteConfig", "PromotionLockSettings", "PromotionTracking", "DIRECTIONS"]
