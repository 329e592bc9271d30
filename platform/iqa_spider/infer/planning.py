"""What to ask the model about one image, and which answer is which when they come back.

Every caller plans through here: the predictor (batch scoring, the pyfunc), Serve's model
deployment and the evaluation job. `Predictor.assemble` turns a plan's results into an
`Analysis`. Evaluation asks the dataset's own questions (`Plan.ask` directly) and scores the
answers itself.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from iqa_spider.annotate import templates as T
from iqa_spider.infer.config import InferConfig
from iqa_spider.infer.queries import Query, QueryResult
from iqa_spider.vocab import SCORE_QUESTION

# The questions the model was trained on (the annotation templates), one fixed wording each.
GLOBAL_DESC_QUESTION = T.GLOBAL_QUESTIONS[0]
LOCAL_DESC_QUESTION = T.LOCAL_QUESTIONS[0]   # "... {region}."
REFER_QUESTION = T.REFER_QUESTIONS[0]        # "... {region}?"
REFER_LONG_QUESTION = T.REFER_LONG_QUESTIONS[0]  # "... {region}, and how do they change its appearance?"


@dataclass(frozen=True)
class Ask:
    """What a caller wants about one image besides its score, which is always asked."""

    describe: bool = False                   # the global description
    ground: tuple[str, ...] = ()             # grounding questions
    describe_regions: tuple[str, ...] = ()   # local descriptions of regions named in text
    refer: tuple[str, ...] = ()              # referring questions about regions named in text
    refer_long: bool = False                 # the long referring answer (effects too)

    @classmethod
    def from_spec(cls, spec: dict) -> Ask:
        """From the plain dict that travels to Serve's model deployment (`as_spec`)."""
        return cls(describe=bool(spec.get("describe")), ground=tuple(spec.get("ground") or ()),
                   describe_regions=tuple(spec.get("describe_regions") or ()), refer=tuple(spec.get("refer") or ()),
                   refer_long=bool(spec.get("refer_long")))

    def as_spec(self) -> dict:
        return {"describe": self.describe, "ground": list(self.ground), "describe_regions": list(self.describe_regions),
                "refer": list(self.refer), "refer_long": self.refer_long}


@dataclass
class Plan:
    """The engine queries for one image, in the order asked, and a slot per query saying what
    its answer is: ``(kind, key)``."""

    queries: list[Query] = field(default_factory=list)
    slots: list[tuple[str, Any]] = field(default_factory=list)

    def ask(self, query: Query, kind: str, key: Any = None) -> None:
        self.queries.append(query)
        self.slots.append((kind, key))

    def answers(self, results: Sequence[QueryResult]) -> Iterator[tuple[str, Any, Query, QueryResult]]:
        """``(kind, key, query, result)`` for each query, given the engine's results in query order."""
        if len(results) != len(self.queries):
            raise ValueError(f"{len(results)} results for {len(self.queries)} queries")
        for (kind, key), query, result in zip(self.slots, self.queries, results):
            yield kind, key, query, result


def describe_query(cfg: InferConfig, region: str | None = None) -> Query:
    """The global description question (``region`` None), or the local one about ``region``."""
    question = GLOBAL_DESC_QUESTION if region is None else LOCAL_DESC_QUESTION.format(region=region)
    return Query(question, max_new_tokens=cfg.describe_max_new_tokens)


def ground_query(cfg: InferConfig, question: str) -> Query:
    return Query(question, max_new_tokens=cfg.max_new_tokens)


def refer_query(cfg: InferConfig, region: str, long: bool = False) -> Query:
    """The referring question about ``region``: the short one (distortion names), or the
    long one (their effects too), with the longer token cap."""
    if long:
        return Query(REFER_LONG_QUESTION.format(region=region), max_new_tokens=cfg.describe_max_new_tokens)
    return Query(REFER_QUESTION.format(region=region), max_new_tokens=cfg.max_new_tokens)


def plan_for(cfg: InferConfig, ask: Ask) -> Plan:
    """Score first, then the global description, local descriptions, referring and grounding
    questions. Kinds: ``score``, ``describe``, ``local`` (key: the region), ``refer`` (key: the
    region) and ``ground`` (key: the question)."""
    plan = Plan()
    plan.ask(Query(SCORE_QUESTION, mode="score"), "score")
    if ask.describe:
        plan.ask(describe_query(cfg), "describe")
    for region in ask.describe_regions:
        plan.ask(describe_query(cfg, region), "local", region)
    for region in ask.refer:
        plan.ask(refer_query(cfg, region, ask.refer_long), "refer", region)
    for question in ask.ground:
        plan.ask(ground_query(cfg, question), "ground", question)
    return plan


__all__ = ["Ask", "Plan", "plan_for", "describe_query", "ground_query", "refer_query", "GLOBAL_DESC_QUESTION",
           "LOCAL_DESC_QUESTION", "REFER_QUESTION", "REFER_LONG_QUESTION"]
