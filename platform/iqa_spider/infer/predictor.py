"""The predictor (model + engine) and the grounding head (predictor + segmenter).

``Predictor`` answers for a batch of PIL images:

- ``score``: Q-Align score 1..5, level and the five level probabilities (one forward pass);
- ``describe``: a global description, or a local one of a region named in text;
- ``refer``: the distortions of a region named in text (short or long);
- ``ground``: a grounding answer (HyD-G, SiD-G, DAO-G question) with its position-word
  probabilities and point(s) by the configured text-to-point mapping;
- ``analyze``: all of the above that a result row holds, asked together so that one image
  prefill serves every question.

``GroundingHead`` adds the segmenter: masks for the points (and the full mask for an answer
about the whole image). It is what batch scoring and serving deploy, and its
``predict_rows`` turns encoded images into result-contract rows, one per input, with
``error`` set for an input that cannot be scored.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from iqa_spider.config.schemas import ModelConfig
from iqa_spider.images import ImageError, decode_image, prepare_image
from iqa_spider.infer.config import HYD_QUESTION, InferConfig, SegmenterConfig
from iqa_spider.infer.engine import Engine, Query, QueryResult
from iqa_spider.infer.planning import Ask, Plan, describe_query, ground_query, plan_for, refer_query
from iqa_spider.infer.segmenters import build_segmenter
from iqa_spider.infer.text_to_point import Point, PositionPair, find_pairs, get_mapping, is_whole_image
from iqa_spider.model.loading import load_model
from iqa_spider.vocab import SCORE_QUESTION

log = logging.getLogger(__name__)

@dataclass
class ScoreResult:
    score: float                 # 1..5
    level: str                   # argmax level word
    level_probs: list[float]     # p(excellent, good, fair, poor, bad), sums to 1


@dataclass
class Grounding:
    """One grounding answer: text, detected position mentions, point(s), mask."""

    query: str
    answer: str
    width: int
    height: int
    whole_image: bool
    pairs: list[PositionPair] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    mask: np.ndarray | None = None    # set by GroundingHead: bool HxW, union of `masks`; full for whole_image
    masks: list[np.ndarray] = field(default_factory=list)  # one per point (GroundingHead)

    def points_by(self, mapping: str, tau: float = 1.0) -> list[Point]:
        """The point(s) another mapping would give for this same answer."""
        if self.whole_image:
            return []
        return get_mapping(mapping)(self.pairs, self.width, self.height, tau)


@dataclass
class TextAnswer:
    """A local description or a referring answer about a region named in text."""

    region: str
    query: str
    answer: str


@dataclass
class Analysis:
    """Everything asked about one image, assembled from a `Plan`'s answers."""

    width: int
    height: int
    score: ScoreResult | None = None
    description: str | None = None
    regions: list[Grounding] = field(default_factory=list)   # grounding answers
    local_descriptions: list[TextAnswer] = field(default_factory=list)
    referring: list[TextAnswer] = field(default_factory=list)


def _as_list(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values, one per image, got {len(value)}")
        return list(value)
    return [value] * n


class Predictor:
    """Model + processor + engine. Build with :meth:`load` or from a loaded model."""

    def __init__(self, model, processor, infer: InferConfig | None = None, model_uri: str | None = None,
                 model_version: str | None = None):
        self.model, self.processor = model, processor
        self.cfg = infer or InferConfig()
        self.model_uri, self.model_version = model_uri, model_version
        self.engine = Engine(model, processor, batch_size=self.cfg.batch_size, max_rows=self.cfg.max_rows)

    @classmethod
    def load(cls, model_cfg: ModelConfig, infer: InferConfig | None = None) -> Predictor:
        infer = infer or InferConfig()
        loaded = load_model(model_cfg, infer.cache_dir)
        return cls(loaded.model, loaded.processor, infer, loaded.uri, loaded.version)

    # ---------------------------------------------------------------- primitives

    def run(self, images: Sequence[Image.Image], queries: Sequence[Sequence[Query]],
            prefix_sharing: bool | None = None) -> list[list[QueryResult]]:
        """Raw engine results for ``queries[i]`` about ``images[i]``."""
        images = [prepare_image(im) for im in images]
        share = self.cfg.prefix_sharing if prefix_sharing is None else prefix_sharing
        return self.engine.run(images, queries, prefix_sharing=share)

    @staticmethod
    def score_of(result: QueryResult) -> ScoreResult:
        return ScoreResult(float(result.score), result.level, [float(p) for p in result.level_probs])

    def grounding_of(self, result: QueryResult, question: str, width: int, height: int,
                     mapping: str | None = None) -> Grounding:
        """Text-to-point for one answer: whole-image rule, position steps, mapping."""
        answer = result.text or ""
        if is_whole_image(answer):
            return Grounding(question, answer, width, height, True)
        steps = self.engine.positions.steps(result.token_ids, result.watch_logits
                                            if result.watch_logits is not None else np.zeros((0, 0)))
        pairs = find_pairs(steps)
        points = get_mapping(mapping or self.cfg.mapping)(pairs, width, height, self.cfg.tau)
        return Grounding(question, answer, width, height, False, pairs, points)

    # ---------------------------------------------------------------- tasks

    def score(self, images: Sequence[Image.Image]) -> list[ScoreResult]:
        res = self.run(images, [[Query(SCORE_QUESTION, mode="score")] for _ in images])
        return [self.score_of(r[0]) for r in res]

    def describe(self, images: Sequence[Image.Image], region: str | Sequence[str | None] | None = None) -> list[str]:
        """Global description (region None) or local description of a region named in text,
        e.g. "the sky in the top left of the image"."""
        regions = _as_list(region, len(images))
        queries = [[describe_query(self.cfg, r)] for r in regions]
        return [r[0].text or "" for r in self.run(images, queries)]

    def refer(self, images: Sequence[Image.Image], region: str | Sequence[str], long: bool = False) -> list[str]:
        """Distortions of a region named in text; ``long`` allows the longer answer (effects)."""
        regions = _as_list(region, len(images))
        queries = [[refer_query(self.cfg, r, long)] for r in regions]
        return [r[0].text or "" for r in self.run(images, queries)]

    def ground(self, images: Sequence[Image.Image], questions: str | Sequence[str] | None = None,
               mapping: str | None = None) -> list[list[Grounding]]:
        """Grounding answers with points for each question (default: the HyD-G question)."""
        qs = [HYD_QUESTION] if questions is None else ([questions] if isinstance(questions, str) else list(questions))
        res = self.run(images, [[ground_query(self.cfg, q) for q in qs] for _ in images])
        return [[self.grounding_of(r, q, im.width, im.height, mapping) for r, q in zip(rs, qs)]
                for im, rs in zip(images, res)]

    def ground_forced(self, images: Sequence[Image.Image], questions: Sequence[Sequence[str]],
                      answers: Sequence[Sequence[str]], mapping: str | None = None) -> list[list[Grounding]]:
        """Text-to-point on given answers (teacher forced, one forward pass, no generation):
        the position logits the model assigns at the steps of the answer's position words.
        Measures the mappings independently of what the model would have written."""
        queries = [[Query(q, mode="force", answer=a) for q, a in zip(qs, ans)] for qs, ans in zip(questions, answers)]
        res = self.run(images, queries)
        return [[self.grounding_of(r, q, im.width, im.height, mapping) for r, q in zip(rs, qs)]
                for im, rs, qs in zip(images, res, questions)]

    def analyze(self, images: Sequence[Image.Image], describe: bool | None = None,
                ground_questions: Sequence[str] | None = None, mapping: str | None = None) -> list[Analysis]:
        """Score + (global description) + grounding answers, every question of an image
        sharing one prefill. ``mapping``: text-to-point mapping for this call (default: the config's)."""
        describe = self.cfg.describe if describe is None else describe
        gq = tuple(self.cfg.ground_questions if ground_questions is None else ground_questions)
        plan = plan_for(self.cfg, Ask(describe=describe, ground=gq))
        res = self.run(images, [plan.queries] * len(images))
        return [self.assemble(plan, rs, im.width, im.height, mapping) for im, rs in zip(images, res)]

    def assemble(self, plan: Plan, results: Sequence[QueryResult], width: int, height: int,
                 mapping: str | None = None) -> Analysis:
        """The `Analysis` of one image from its plan's results; points in ``width`` x ``height``."""
        a = Analysis(width, height)
        for kind, key, q, r in plan.answers(results):
            if kind == "score":
                a.score = self.score_of(r)
            elif kind == "describe":
                a.description = r.text or ""
            elif kind == "local":
                a.local_descriptions.append(TextAnswer(key, q.question, r.text or ""))
            elif kind == "refer":
                a.referring.append(TextAnswer(key, q.question, r.text or ""))
            elif kind == "ground":
                a.regions.append(self.grounding_of(r, key, width, height, mapping))
            else:
                raise ValueError(f"no answer kind {kind!r} to assemble")
        return a


class GroundingHead:
    """Predictor + segmenter: grounding answers with points *and* masks."""

    def __init__(self, predictor: Predictor, segmenter):
        self.predictor, self.segmenter = predictor, segmenter

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, infer: InferConfig | None = None,
                    segmenter: SegmenterConfig | None = None) -> GroundingHead:
        return cls(Predictor.load(model_cfg, infer), build_segmenter(segmenter or SegmenterConfig()))

    @property
    def cfg(self) -> InferConfig:
        return self.predictor.cfg

    def attach_masks(self, image: Image.Image, groundings: Sequence[Grounding]) -> None:
        """The segmenter's masks for these groundings (`Segmenter.attach_masks`)."""
        self.segmenter.attach_masks(image, groundings)

    def ground(self, images: Sequence[Image.Image], questions: str | Sequence[str] | None = None,
               mapping: str | None = None) -> list[list[Grounding]]:
        out = self.predictor.ground(images, questions, mapping)
        for im, gs in zip(images, out):
            self.attach_masks(im, gs)
        return out

    def analyze(self, images: Sequence[Image.Image], describe: bool | None = None,
                ground_questions: Sequence[str] | None = None, mapping: str | None = None) -> list[Analysis]:
        out = self.predictor.analyze(images, describe, ground_questions, mapping)
        for im, a in zip(images, out):
            self.attach_masks(im, a.regions)
        return out

    # ---------------------------------------------------------------- result rows

    def predict_rows(self, items: Sequence[tuple[str | None, bytes]], describe: bool | None = None,
                     ground_questions: Sequence[str] | None = None, mapping: str | None = None) -> list[dict]:
        """Result-contract rows for encoded images ``(image_uri, bytes)``, in input order
        (``mapping``: text-to-point mapping for this call; default the config's).

        Never raises for a bad input: an undecodable image, or one the model fails on, gets a
        row with ``error`` set, and every input appears exactly once.
        """
        from iqa_spider.infer import results as R  # see analysis_rows

        scored_at = dt.datetime.now(dt.timezone.utc)
        meta = {"model_uri": self.predictor.model_uri, "model_version": self.predictor.model_version,
                "scored_at": scored_at}
        rows: list[dict | None] = [None] * len(items)
        good: list[tuple[int, Image.Image, str]] = []
        for i, (uri, data) in enumerate(items):
            sha = hashlib.sha256(data or b"").hexdigest()
            try:
                img = prepare_image(decode_image(data, self.cfg.max_pixels))
            except ImageError as exc:
                width, height = exc.size or (None, None)
                rows[i] = R.error_row(uri, sha, str(exc), width, height, **meta)
                continue
            good.append((i, img, sha))
        decoded = [(items[i][0], sha, img) for i, img, sha in good]
        for (i, _, _), row in zip(good, self.analysis_rows(decoded, describe, ground_questions, mapping, meta)):
            rows[i] = row
        return rows  # type: ignore[return-value]

    def analysis_rows(self, decoded: Sequence[tuple[str | None, str, Image.Image]], describe: bool | None,
                      ground_questions: Sequence[str] | None, mapping: str | None, meta: dict,
                      after_batch: Callable[[int], None] | None = None) -> list[dict]:
        """Result rows for decoded images ``(image_uri, sha256, image)``, in order, analysed in
        batches of ``cfg.batch_size``. A batch that fails is retried image by image, and an image
        the model still fails on gets an error row; ``meta`` (model_uri, model_version,
        scored_at) goes into every row. ``after_batch(k)`` runs after batch k (batch scoring's
        crash drill uses it)."""
        # results (pycocotools, for the masks' RLE) only here: the model-only paths (score,
        # ground, analyze) run on the GPU benchmark's image, which has no pycocotools
        from iqa_spider.infer import results as R

        rows: list[dict] = []
        bs = self.cfg.batch_size
        for k, start in enumerate(range(0, len(decoded), bs)):
            batch = decoded[start:start + bs]
            analyses = isolate_failures(lambda imgs: self.analyze(imgs, describe, ground_questions, mapping),
                                        [img for _, _, img in batch])
            for (uri, sha, img), a in zip(batch, analyses):
                if isinstance(a, Exception):
                    rows.append(R.error_row(uri, sha, R.inference_error(a), width=img.width, height=img.height,
                                            **meta))
                else:
                    rows.append(R.analysis_row(a, uri, sha, **meta))
            if after_batch is not None:
                after_batch(k)
        return rows


def isolate_failures(run, items: list) -> list:
    """``run(items)``, and if the batch fails, each item alone: one bad image costs only its own
    result, which is then the exception it raised (every batch caller turns it into an error row)."""
    try:
        return run(items)
    except Exception:
        log.exception("a batch of %d images failed; retrying one by one", len(items))
        out: list = []
        for item in items:
            try:
                out.append(run([item])[0])
            except Exception as exc:  # noqa: BLE001
                out.append(exc)
        return out


__all__ = ["Predictor", "isolate_failures", "GroundingHead", "Grounding", "Analysis", "ScoreResult", "TextAnswer",
           "prepare_image"]
