"""A small Qwen-form tokenizer trained locally on the project's own template text.

The tiny models of tests and the demo cannot download Qwen's tokenizer, so the project
trains one: byte-level BPE with exactly the normalizer and pre-tokenizer of
``transformers``' ``Qwen2Tokenizer`` (NFC, Qwen's split regex, byte level), on a few thousand
sentences of image-quality talk generated from templates (:func:`template_corpus`). The
result is wrapped in the real ``Qwen2Tokenizer`` class (what ``AutoTokenizer`` resolves to for
``qwen2_5_vl`` and ``qwen3_vl``) with Qwen's special tokens and a Qwen-form chat template.

Every word of :func:`iqa_spider.vocab.single_token_words` is one token in both forms, with
and without a leading space (" poor" as it follows "is", and "poor"): plain words through the
BPE merges (the corpus carries them often enough that the trainer merges them whole, and
:func:`build_tokenizer` checks it), hyphenated ones (which Qwen's pre-tokenizer splits at the
hyphen, so no merge can join them) as added tokens " word" and "word".

:func:`word_token_id` gives the id the model emits for a word mid-sentence; with a real
tokenizer that splits a word it returns the first sub-token and warns once.
"""
from __future__ import annotations

import json
import logging
import random
import warnings
from typing import Any

from iqa_spider import vocab as V

logger = logging.getLogger(__name__)

# Qwen2.5-VL's special tokens, in Qwen's order (ids follow the BPE vocabulary, as in Qwen).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added but not special in Qwen's tokenizers (Qwen3-VL adds the think/tool-response ones).
QWEN_PLAIN_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

DEFAULT_VOCAB_SIZE = 1280
_CORPUS_SEED = 0
_CORPUS_SIZE = 4000
# How often each IQA word is shown to the trainer on its own, in each form; with the template
# sentences this puts every plain word among the most frequent pre-tokens.
_WORD_REPEATS = 64

# Qwen2-VL / Qwen2.5-VL chat template (the released one): a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|>, add_generation_prompt opens the assistant turn.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL form (the released template without tool calling and reasoning): no default
# system turn; a system message's content may be a string or a list of text parts.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE,
    "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE,
}

# --------------------------------------------------------------------------------------
# Template corpus
# --------------------------------------------------------------------------------------

_OBJECTS = (
    "sky", "car", "tree", "trees", "building", "road", "person", "woman", "man", "child", "face",
    "dog", "cat", "curtain", "wall", "water", "grass", "window", "table", "flower", "flowers",
    "mountain", "clouds", "boat", "bird", "chair", "lamp", "sign", "door", "background",
    "foreground", "street", "bridge", "river", "field", "roof", "fence", "bicycle", "horse",
    "statue", "plate", "cup", "book", "shelf", "floor", "hair", "shirt", "hat", "leaves",
    "rocks", "sand", "snow", "beach", "house", "tower", "train", "bus", "umbrella", "bench",
)
_ADJECTIVES = (
    "red", "blue", "green", "white", "black", "yellow", "small", "large", "old", "wooden",
    "distant", "bright", "dark", "tall", "parked", "open", "cloudy", "stone",
)
_EFFECTS = (
    "loss of fine detail", "soft and smeared edges", "a grainy texture", "blocky artifacts",
    "washed-out colors", "lost shadow detail", "a dull and flat appearance", "harsh halos around edges",
    "visible color banding", "reduced visibility of textures", "unnatural colors",
    "clipped highlights", "mosaic-like blocks", "speckles in smooth areas", "ringing near edges",
    "faded colors", "overly vivid colors", "crushed dark areas", "hazy contrast",
    "jagged contours", "muddy details", "a noisy and rough surface",
)
_GLOBAL_QUESTIONS = (
    "Assess the quality of the image with a detailed explanation.",
    "Describe the quality of this image in detail.",
    "Evaluate the image quality and explain your reasoning.",
    "How is the quality of the image? Give a detailed explanation.",
    "Provide a careful evaluation of the image quality.",
    "What is the overall quality of this image, and why?",
    "Analyze the distortions in this image and rate its quality.",
)
_LOCAL_QUESTIONS = (
    "Provide a careful evaluation of the {region}.",
    "Describe the quality of the {region}.",
    "Assess the quality of the {region} with a detailed explanation.",
    "How does the {region} look in terms of quality?",
)
_REFER_QUESTIONS = (
    "What distortions affect the {region}?",
    "Which distortions are present in the {region}?",
    "What degrades the {region}?",
    "List the distortions of the {region}.",
)
_RATING_ANSWER_TAILS = (".", "", " overall.")


def _position_phrases() -> list[str]:
    """Region location phrases over the 2x2 and 3x3 position vocabularies."""
    phrases = []
    for v in V.VERTICAL_3:
        for h in V.HORIZONTAL_3:
            if v == "middle" and h == "center":
                phrases.append("in the center of the image")
            else:
                phrases.append(f"in the {v} {h} of the image")
    for h in V.HORIZONTAL_2:
        phrases.append(f"on the {h} side of the image")
    for v in V.VERTICAL_2:
        phrases.append(f"at the {v} of the image")
    phrases.append("in the middle of the image")
    phrases.append("near the center of the image")
    return phrases


def _severity(rng: random.Random, capital: bool = False) -> str:
    word = V.SEVERITY_WORDS[rng.randint(1, 5)]
    return word.capitalize() if capital else word


def _distortion_list(rng: random.Random, k: int) -> list[str]:
    return rng.sample(list(V.DISTORTION_TERMS.values()), k)


def _short_referring(rng: random.Random) -> str:
    terms = _distortion_list(rng, rng.randint(1, 3))
    parts = [f"{_severity(rng)} {t}" for t in terms]
    parts[0] = parts[0][0].upper() + parts[0][1:]
    return ", ".join(parts) + "."


def _long_referring(rng: random.Random) -> str:
    terms = _distortion_list(rng, rng.randint(1, 2))
    sentences = []
    for t in terms:
        verb = rng.choice(("causes", "leads to", "results in", "introduces"))
        sentences.append(f"{_severity(rng, capital=True)} {t} {verb} {rng.choice(_EFFECTS)}.")
    return " ".join(sentences)


def _region(rng: random.Random, positions: list[str]) -> str:
    obj = rng.choice(_OBJECTS)
    if rng.random() < 0.4:
        obj = f"{rng.choice(_ADJECTIVES)} {obj}"
    return f"{obj} {rng.choice(positions)}"


def _global_description(rng: random.Random, positions: list[str]) -> str:
    level = rng.choice(V.LEVEL_WORDS)
    n = rng.randint(1, 3)
    sentences = [
        rng.choice((
            f"The image shows a {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)} near a {rng.choice(_OBJECTS)}.",
            f"This image depicts a {rng.choice(_OBJECTS)} with a {rng.choice(_OBJECTS)} behind it.",
            f"The photo captures the {rng.choice(_OBJECTS)} and the {rng.choice(_OBJECTS)}.",
        ))
    ]
    for t in _distortion_list(rng, n):
        sentences.append(
            f"{_severity(rng, capital=True)} {t} affects the {_region(rng, positions)}, "
            f"causing {rng.choice(_EFFECTS)}."
        )
    if rng.random() < 0.3:
        sentences.append(f"The whole image suffers from {_severity(rng)} {rng.choice(list(V.DISTORTION_TERMS.values()))}.")
    sentences.append(f"Overall, the quality of the image is {level}.")
    return " ".join(sentences)


def _local_description(rng: random.Random) -> str:
    t = rng.choice(list(V.DISTORTION_TERMS.values()))
    level = rng.choice(V.LEVEL_WORDS)
    return (
        f"This region is affected by {_severity(rng)} {t}, which causes {rng.choice(_EFFECTS)}. "
        f"The quality of this region is {level}."
    )


def template_corpus(n: int = _CORPUS_SIZE, seed: int = _CORPUS_SEED) -> list[str]:
    """A deterministic corpus of image-quality questions and answers from the project's templates.

    Covers every task (global and local descriptions, the three grounding kinds, short and
    long referring, Q-Align rating) and every word of :mod:`iqa_spider.vocab`, including
    ``SCORE_QUESTION`` and ``SCORE_ANSWER_PREFIX``.
    """
    rng = random.Random(seed)
    positions = _position_phrases()
    terms = list(V.DISTORTION_TERMS.values())
    out: list[str] = []
    # Fixed lines first so every vocabulary word and prompt is present whatever n is.
    out.append("You are a helpful assistant.")
    out.append(V.SCORE_QUESTION)
    out.extend(_GLOBAL_QUESTIONS)
    out.append("Which is the most degraded region in the image?")
    for t in terms:
        out.append(f"Which region shows the most severe {t}?")
    region = "sky in the top left of the image"
    out.extend(q.format(region=region) for q in _LOCAL_QUESTIONS + _REFER_QUESTIONS)
    for level in V.LEVEL_WORDS:
        out.append(f"{V.SCORE_ANSWER_PREFIX} {level}")
        out.append(f"{V.SCORE_ANSWER_PREFIX} {level}.")
        out.append(f"Overall, the quality of the image is {level}.")
    for word in V.SEVERITY_WORDS.values():
        for t in terms:
            out.append(f"{word.capitalize()} {t}, {word} {t}.")
    for p in positions:
        out.append(f"The most degraded region is the {rng.choice(_OBJECTS)} {p}.")
    makers = (
        lambda: rng.choice(_GLOBAL_QUESTIONS),
        lambda: _global_description(rng, positions),
        lambda: rng.choice(_LOCAL_QUESTIONS).format(region=_region(rng, positions)),
        lambda: _local_description(rng),
        lambda: "Which is the most degraded region in the image?",
        lambda: f"Which region shows the most severe {rng.choice(terms)}?",
        lambda: (lambda a, b: f"Which region shows {a} added before {b}?")(*_distortion_list(rng, 2)),
        lambda: f"The most degraded region is the {_region(rng, positions)}.",
        lambda: "The most degraded region is the whole image.",
        lambda: rng.choice(_REFER_QUESTIONS).format(region=_region(rng, positions)),
        lambda: _short_referring(rng),
        lambda: _long_referring(rng),
        lambda: V.SCORE_QUESTION,
        lambda: f"{V.SCORE_ANSWER_PREFIX} {rng.choice(V.LEVEL_WORDS)}{rng.choice(_RATING_ANSWER_TAILS)}",
    )
    while len(out) < n:
        out.append(rng.choice(makers)())
    return out


# --------------------------------------------------------------------------------------
# Training and wrapping
# --------------------------------------------------------------------------------------


def _qwen_backend():
    """An empty ``tokenizers.Tokenizer`` with Qwen2Tokenizer's exact normalizer and pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _word_forms(word: str) -> tuple[str, str]:
    return (word, " " + word)


def _needs_added_token(backend, word: str) -> bool:
    """True when the pre-tokenizer splits the word, so no BPE merge can make it one token."""
    pieces = backend.pre_tokenizer.pre_tokenize_str(" " + word)
    return len(pieces) != 1


def train_bpe(vocab_size: int = DEFAULT_VOCAB_SIZE, corpus: list[str] | None = None):
    """Train the byte-level BPE (no special tokens) and return ``(vocab, merges)``."""
    from tokenizers import pre_tokenizers, trainers

    backend = _qwen_backend()
    corpus = template_corpus() if corpus is None else corpus
    boost: list[str] = []
    for word in V.single_token_words():
        if not _needs_added_token(backend, word):
            boost.extend(_word_forms(word) * _WORD_REPEATS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus + boost, trainer=trainer, length=len(corpus) + len(boost))
    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def build_tokenizer(family: str = "qwen2_5_vl", vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train and wrap the tokenizer as transformers' ``Qwen2Tokenizer``; deterministic.

    Returns the tokenizer with Qwen's special tokens, the hyphenated IQA words as added tokens
    and the chat template of ``family``. Raises if any IQA word is not one token.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    if family not in CHAT_TEMPLATES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    vocab, merges = train_bpe(vocab_size)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    # Qwen's special tokens, in Qwen's order, right after the BPE vocabulary.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED_TOKENS])
    tok.eos_token = "<|im_end|>"  # as in Qwen's instruct tokenizers: a turn ends the answer
    # Words the pre-tokenizer splits (hyphenated ones) as whole tokens, both forms; " word"
    # wins mid-sentence (leftmost match), "word" at the start of a piece of text.
    backend = _qwen_backend()
    extra = []
    for word in V.single_token_words():
        if _needs_added_token(backend, word):
            extra.extend(AddedToken(f, special=False, normalized=False, single_word=False)
                         for f in _word_forms(word))
    tok.add_tokens(extra)
    tok.chat_template = CHAT_TEMPLATES[family]
    check_single_tokens(tok)
    return tok


def check_single_tokens(tokenizer, words: list[str] | None = None) -> None:
    """Raise ValueError unless each word is one token with and without a leading space and
    the word ends a sentence such as "The quality of the image is poor" as one token."""
    bad = []
    for word in V.single_token_words() if words is None else words:
        for form in _word_forms(word):
            ids = tokenizer.encode(form, add_special_tokens=False)
            if len(ids) != 1 or tokenizer.decode(ids) != form:
                bad.append((form, tokenizer.convert_ids_to_tokens(ids)))
        ids = tokenizer.encode(f"{V.SCORE_ANSWER_PREFIX} {word}", add_special_tokens=False)
        if tokenizer.decode(ids[-1:]) != " " + word:
            bad.append((f"... {word}", tokenizer.convert_ids_to_tokens(ids)))
    if bad:
        raise ValueError(f"IQA words that are not one token: {bad}")


_WARNED: set[tuple[str, str]] = set()


def word_token_id(tokenizer: Any, word: str) -> int:
    """The id of the token the model emits for ``word`` mid-sentence (after a space).

    With the project's tokenizer every IQA word is one token. A real tokenizer may split a
    word; then the first sub-token stands for it and this warns once per (tokenizer, word).
    """
    ids = tokenizer.encode(" " + word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} to no tokens")
    if len(ids) > 1:
        key = (str(getattr(tokenizer, "name_or_path", "")), word)
        if key not in _WARNED:
            _WARNED.add(key)
            pieces = tokenizer.convert_ids_to_tokens(ids)
            msg = f"{word!r} is {len(ids)} tokens {pieces} for this tokenizer; using the first sub-token"
            warnings.warn(msg, stacklevel=2)
            logger.warning(msg)
    return int(ids[0])
