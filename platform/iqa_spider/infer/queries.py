"""The engine's unit of work: one question about one image (`Query`) and its answer
(`QueryResult`). Apart from the engine so that planning questions, in the API's ingress or a
config check, imports neither torch nor the model code."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from iqa_spider.vocab import LEVEL_WEIGHTS, LEVEL_WORDS, SCORE_QUESTION

MODES = ("score", "generate", "force")


@dataclass
class Query:
    """One question about one image.

    mode ``score``: the Q-Align rating (the question defaults to SCORE_QUESTION and the answer
    prefix to SCORE_ANSWER_PREFIX); ``generate``: greedy answer up to ``max_new_tokens``;
    ``force``: teacher-force ``answer`` and record the position-word logits at each token.
    """

    question: str = SCORE_QUESTION
    mode: str = "generate"
    max_new_tokens: int = 64
    answer: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "force" and not self.answer:
            raise ValueError("mode force needs an answer")


@dataclass
class QueryResult:
    text: str | None = None                   # generated (or forced) answer
    token_ids: list[int] = field(default_factory=list)
    watch_logits: np.ndarray | None = None    # (len(token_ids), len(watch_ids)) float32
    level_probs: list[float] | None = None    # score mode: p(excellent..bad)
    finished: bool = True                     # generate: stopped at eos (False: hit the cap)

    @property
    def score(self) -> float | None:
        if self.level_probs is None:
            return None
        return float(sum(p * w for p, w in zip(self.level_probs, LEVEL_WEIGHTS)))

    @property
    def level(self) -> str | None:
        if self.level_probs is None:
            return None
        return LEVEL_WORDS[int(np.argmax(self.level_probs))]


__all__ = ["Query", "QueryResult", "MODES"]
