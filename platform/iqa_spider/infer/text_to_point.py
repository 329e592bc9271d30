"""Text-to-point grounding (stage 2 of IQA-Spider, training free).

The model answers a grounding question in words ("The most degraded region is the sky in
the top left of the image."). At the decoding step where it wrote the vertical position
word, the logits of the vertical vocabulary become probabilities (softmax with temperature
tau); likewise the horizontal vocabulary at the horizontal word. A *mapping* turns those
probabilities into point(s) in pixels. Every mapping is a named function in ``MAPPINGS`` so
the evaluation harness can measure them side by side on the same answers:

- ``paper``: the paper's rule, x = p(right) W, y = p(bottom) H (2-word vocabularies).
- ``expected_bin_centre``: the expected bin centre, x = (0.25 p(left) + 0.75 p(right)) W, so
  a confident answer lands in the middle of its half instead of on the image border.
- ``bins3x3``: the 3x3 vocabulary (left/center/right, top/middle/bottom) with bin centres
  1/6, 1/2, 5/6.
- ``multi_point``: one expected-bin-centre point per (vertical, horizontal) pair the answer
  contains, for answers that name several regions.

An answer about the whole image ("The whole image is affected by ...") gets no point and
the full mask (the whole-image rule). This module is pure numpy: the predictor records the
logits of the position words at every decoding step and hands them here.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from iqa_spider.model.tokenizer import word_token_id
from iqa_spider.vocab import HORIZONTAL_2, HORIZONTAL_3, VERTICAL_2, VERTICAL_3

VERTICAL_WORDS: tuple[str, ...] = VERTICAL_3      # top, middle, bottom
HORIZONTAL_WORDS: tuple[str, ...] = HORIZONTAL_3  # left, center, right
_AXIS_WORDS = {"v": VERTICAL_WORDS, "h": HORIZONTAL_WORDS}

_WHOLE_IMAGE = re.compile(r"\b(?:whole|entire)\s+(?:image|picture|photo)\b", re.IGNORECASE)


def is_whole_image(answer: str) -> bool:
    """The whole-image rule: the answer names the whole (entire) image as the region."""
    return bool(_WHOLE_IMAGE.search(answer or ""))


@dataclass(frozen=True)
class PositionStep:
    """A decoding step that produced a position word, with the logits of its axis's words.

    ``logits`` maps each word of the axis (top/middle/bottom or left/center/right) to its
    logit at that step, all in the same surface form (" top" or "top") as the word written.
    """

    step: int
    axis: str  # "v" or "h"
    word: str
    logits: dict[str, float]


@dataclass(frozen=True)
class PositionPair:
    """A (vertical, horizontal) mention such as "top left"; either side may be missing."""

    vertical: PositionStep | None
    horizontal: PositionStep | None

    @property
    def words(self) -> tuple[str | None, str | None]:
        return (self.vertical.word if self.vertical else None,
                self.horizontal.word if self.horizontal else None)


@dataclass(frozen=True)
class Point:
    x: float          # pixels, 0..W-1
    y: float          # pixels, 0..H-1
    p_right: float    # softmax over {left, right} at the horizontal word (0.5 if none)
    p_bottom: float   # softmax over {top, bottom} at the vertical word (0.5 if none)


class PositionVocab:
    """Token ids of the position words in a tokenizer, in both surface forms.

    The model writes " top" mid-sentence (the form :func:`word_token_id` gives) and could
    write "top" right after a newline; both are watched. Where a tokenizer splits a word its
    first sub-token stands for it (``word_token_id`` warns once).
    """

    def __init__(self, tokenizer):
        self.forms: dict[str, dict[str, int]] = {"space": {}, "bare": {}}
        for word in VERTICAL_WORDS + HORIZONTAL_WORDS:
            self.forms["space"][word] = word_token_id(tokenizer, word)
            bare = tokenizer.encode(word, add_special_tokens=False)
            if bare:
                self.forms["bare"][word] = int(bare[0])
        # A bare form that collides with another word's id (a split tokenizer) is dropped.
        space_ids = set(self.forms["space"].values())
        bare = self.forms["bare"]
        if len(set(bare.values())) != len(bare) or space_ids & set(bare.values()):
            self.forms["bare"] = {}
        self.watch_ids: list[int] = list(dict.fromkeys(
            list(self.forms["space"].values()) + list(self.forms["bare"].values())))
        self._col = {tid: i for i, tid in enumerate(self.watch_ids)}
        # token id -> (form, axis, word)
        self._by_id: dict[int, tuple[str, str, str]] = {}
        for form, words in self.forms.items():
            for word, tid in words.items():
                axis = "v" if word in VERTICAL_WORDS else "h"
                self._by_id.setdefault(tid, (form, axis, word))

    def steps(self, token_ids: Sequence[int], watch_logits: np.ndarray) -> list[PositionStep]:
        """Every step whose token is a position word, with that step's logits of its axis.

        ``watch_logits[t]`` are the logits of ``watch_ids`` at the step that produced
        ``token_ids[t]``.
        """
        out = []
        for t, tid in enumerate(token_ids):
            hit = self._by_id.get(int(tid))
            if hit is None:
                continue
            form, axis, word = hit
            ids = self.forms[form]
            logits = {w: float(watch_logits[t, self._col[ids[w]]]) for w in _AXIS_WORDS[axis] if w in ids}
            out.append(PositionStep(t, axis, word, logits))
        return out


def find_pairs(steps: Sequence[PositionStep]) -> list[PositionPair]:
    """Group position steps into mentions, in answer order.

    A vertical word immediately followed by a horizontal word ("top left") is one pair.
    Otherwise a lone word is a pair with one side missing ("at the top of the image",
    "on the left side"). Pairs come first: a single-point mapping uses ``pairs[0]``, so a
    stray position word elsewhere never beats a full "vertical horizontal" mention.
    """
    full: list[PositionPair] = []
    lone: list[PositionPair] = []
    i = 0
    while i < len(steps):
        s = steps[i]
        nxt = steps[i + 1] if i + 1 < len(steps) else None
        if s.axis == "v" and nxt is not None and nxt.axis == "h" and nxt.step == s.step + 1:
            full.append(PositionPair(s, nxt))
            i += 2
            continue
        lone.append(PositionPair(s, None) if s.axis == "v" else PositionPair(None, s))
        i += 1
    return full + lone


def softmax_words(step: PositionStep | None, words: Sequence[str], tau: float) -> np.ndarray | None:
    """Softmax with temperature over ``words`` at ``step`` (None if the step is missing)."""
    if step is None or not all(w in step.logits for w in words):
        return None
    z = np.array([step.logits[w] for w in words], dtype=np.float64) / float(tau)
    z -= z.max()
    e = np.exp(z)
    return e / e.sum()


def two_way(pair: PositionPair, tau: float) -> tuple[float, float]:
    """(p_right, p_bottom) over the paper's 2-word vocabularies; 0.5 for a missing side."""
    ph = softmax_words(pair.horizontal, HORIZONTAL_2, tau)
    pv = softmax_words(pair.vertical, VERTICAL_2, tau)
    return (float(ph[1]) if ph is not None else 0.5, float(pv[1]) if pv is not None else 0.5)


def _clamp(v: float, size: int) -> float:
    return float(min(max(v, 0.0), max(size - 1, 0)))


def _point(fx: float, fy: float, width: int, height: int, pair: PositionPair, tau: float) -> Point:
    p_right, p_bottom = two_way(pair, tau)
    return Point(_clamp(fx * width, width), _clamp(fy * height, height), p_right, p_bottom)


def map_paper(pairs: Sequence[PositionPair], width: int, height: int, tau: float = 1.0) -> list[Point]:
    """The paper: x = p(right) W, y = p(bottom) H (clamped into the image)."""
    if not pairs:
        return []
    p_right, p_bottom = two_way(pairs[0], tau)
    return [_point(p_right, p_bottom, width, height, pairs[0], tau)]


def _bin_centre(pair: PositionPair, tau: float) -> tuple[float, float]:
    p_right, p_bottom = two_way(pair, tau)
    return 0.25 + 0.5 * p_right, 0.25 + 0.5 * p_bottom


def map_expected_bin_centre(pairs: Sequence[PositionPair], width: int, height: int,
                            tau: float = 1.0) -> list[Point]:
    """Expected value over the 2 bins' centres: x = (0.25 p(left) + 0.75 p(right)) W."""
    if not pairs:
        return []
    fx, fy = _bin_centre(pairs[0], tau)
    return [_point(fx, fy, width, height, pairs[0], tau)]


_CENTRES_3 = np.array([1 / 6, 1 / 2, 5 / 6])


def map_bins3x3(pairs: Sequence[PositionPair], width: int, height: int, tau: float = 1.0) -> list[Point]:
    """3x3 vocabulary: expected value over the centres 1/6, 1/2, 5/6 of each axis's thirds."""
    if not pairs:
        return []
    pair = pairs[0]
    ph = softmax_words(pair.horizontal, HORIZONTAL_3, tau)
    pv = softmax_words(pair.vertical, VERTICAL_3, tau)
    fx = float(ph @ _CENTRES_3) if ph is not None else 0.5
    fy = float(pv @ _CENTRES_3) if pv is not None else 0.5
    return [_point(fx, fy, width, height, pair, tau)]


def map_multi_point(pairs: Sequence[PositionPair], width: int, height: int, tau: float = 1.0) -> list[Point]:
    """One expected-bin-centre point per full (vertical, horizontal) pair in the answer
    (or the lone mention if the answer has no full pair)."""
    full = [p for p in pairs if p.vertical is not None and p.horizontal is not None]
    chosen = full or list(pairs[:1])
    out = []
    for pair in chosen:
        fx, fy = _bin_centre(pair, tau)
        out.append(_point(fx, fy, width, height, pair, tau))
    return out


Mapping = Callable[[Sequence[PositionPair], int, int, float], list[Point]]

MAPPINGS: dict[str, Mapping] = {
    "paper": map_paper,
    "expected_bin_centre": map_expected_bin_centre,
    "bins3x3": map_bins3x3,
    "multi_point": map_multi_point,
}


def get_mapping(name: str) -> Mapping:
    try:
        return MAPPINGS[name]
    except KeyError:
        raise ValueError(f"unknown mapping {name!r}; expected one of {', '.join(MAPPINGS)}") from None


def answer_position_words(answer: str) -> list[tuple[str | None, str | None]]:
    """(vertical, horizontal) mentions in an answer's *text* (for position-word accuracy
    and description checks), same grouping rule as :func:`find_pairs`."""
    tokens = re.findall(r"[a-z]+", (answer or "").lower())
    steps = []
    for i, tok in enumerate(tokens):
        if tok in VERTICAL_WORDS:
            steps.append(PositionStep(i, "v", tok, {}))
        elif tok in HORIZONTAL_WORDS:
            steps.append(PositionStep(i, "h", tok, {}))
    return [p.words for p in find_pairs(steps)]


__all__ = ["PositionStep", "PositionPair", "Point", "PositionVocab", "MAPPINGS", "get_mapping",
           "find_pairs", "is_whole_image", "two_way", "softmax_words", "answer_position_words",
           "map_paper", "map_expected_bin_centre", "map_bins3x3", "map_multi_point"]
