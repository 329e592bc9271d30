"""Optional rewrite stage: an instruct model paraphrases answers for fluency, under a truth check.

A rewrite is kept only if it says the same things: the same distortion terms, severity
adjectives, position words and quality levels, each as many times as the original. A
paraphrase that drops, adds or changes any of them is rejected and the template answer
stays, so fluency can never cost correctness.
"""
from __future__ import annotations

import re
from collections import Counter

from iqa_spider.vocab import DISTORTION_TERMS, LEVEL_WORDS, POSITION_WORDS, SEVERITY_WORDS

_TRUTH_WORDS = set(DISTORTION_TERMS.values()) | set(SEVERITY_WORDS.values()) | set(POSITION_WORDS) | set(LEVEL_WORDS)
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")

PROMPT = ("Rewrite the following image-quality description so that it reads fluently. Keep every "
          "distortion name, severity word, position word and quality level exactly as it is. "
          "Reply with the rewritten text only.\n\n{answer}")


def truth_words(text: str) -> Counter:
    return Counter(w for w in _WORD.findall(text.lower()) if w in _TRUTH_WORDS)


def keeps_truth(original: str, rewrite: str) -> bool:
    return bool(rewrite.strip()) and truth_words(original) == truth_words(rewrite)


class Rewriter:
    """Loads the configured HF model once; `__call__` returns (answer, accepted)."""

    def __init__(self, model_path: str, max_new_tokens: int = 96):
        # imported here, not at the top: the truth check (keeps_truth) is used without a model
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
        self.max_new_tokens = max_new_tokens

    def generate(self, answer: str) -> str:
        import torch

        messages = [{"role": "user", "content": [{"type": "text", "text": PROMPT.format(answer=answer)}]}]
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:]
        return self.processor.decode(new, skip_special_tokens=True).strip()

    def __call__(self, answer: str) -> tuple[str, bool]:
        rewrite = self.generate(answer)
        return (rewrite, True) if keeps_truth(answer, rewrite) else (answer, False)
