"""Batched, shared-prefix inference over (image, question) rows.

Every question about an image starts with the same tokens: the system turn, the user turn's
opening and the image (hundreds to thousands of tokens for a real Qwen-VL). The engine
encodes that *shared prefix* once per image and reuses its keys/values for every question:

1. **Prefill.** A batch of images (left padded) runs the vision tower and the language model
   over ``<system><user><vision_start><image pads...><vision_end>`` once, filling a
   ``DynamicCache``. The multimodal RoPE positions come from the model's own
   ``get_rope_index``; the next text position of each image (``max position + 1``) is kept.
2. **Suffix pass.** The cache rows are gathered per question (``index_select`` on the
   batch dimension, so the prefix is computed once and copied, never re-encoded), and one
   forward pass runs every row's suffix: ``question<|im_end|>\\n<|im_start|>assistant\\n`` plus,
   for scoring, the teacher-forced ``The quality of the image is``. Suffixes are left padded
   *between* prefix and suffix, so the last column is every row's last real token and the
   attention mask simply has zeros in the middle; text positions continue from the image's
   next position. Score rows are finished here: the softmax over the five level words is
   read from the last position (no generation). Forced rows (a given answer) read the
   position-word logits at every answer token from the same pass.
3. **Greedy decoding** for the rows that must generate, with a per-row ``max_new_tokens``
   cap and eos stop; the logits of the position words are gathered on the device at every
   step (a (rows, steps, 12) tensor). The host reads back only which rows have finished,
   every STOP_CHECK_EVERY steps (``generate`` reads it every step); finished rows are
   dropped every COMPACT_EVERY steps, and each step gets a 4-D attention mask so that
   transformers does not inspect the mask on the host either.

``run_naive`` is the reference: one processor call and one ``generate`` (or forward) per
(image, question), exactly what a straightforward loop does. Tests assert the two agree.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig

from iqa_spider.infer.queries import MODES, Query, QueryResult
from iqa_spider.infer.text_to_point import PositionVocab
from iqa_spider.model.tokenizer import word_token_id
from iqa_spider.vocab import LEVEL_WORDS, SCORE_ANSWER_PREFIX

log = logging.getLogger(__name__)

_SENTINEL = "<<<IQA-SPIDER-QUESTION>>>"
# Decoding reads which rows have finished only every STOP_CHECK_EVERY steps. Each read is a
# host-device round trip: the host waits for the GPU to drain, then the GPU waits while the
# host launches the next step's kernels (eager PyTorch launches each of them from Python).
# A finished row keeps decoding until the next compaction (its tokens are cut at its end
# token by _result), and the batch stops at most STOP_CHECK_EVERY - 1 steps after its last
# row ended.
STOP_CHECK_EVERY = 4
COMPACT_EVERY = 8  # decoding steps between drops of finished rows
assert COMPACT_EVERY % STOP_CHECK_EVERY == 0  # compaction happens at a read


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The tokenizer's added markup tokens (``<|im_end|>``, ``<|image_pad|>``, ``<tool_call>``):
    its added tokens spelt as tags. Added *words* (the tiny tokenizer's family names) are not."""
    added = (t.content for t in tokenizer.added_tokens_decoder.values())
    return tuple(sorted({t for t in added if len(t) > 2 and t.startswith("<") and t.endswith(">")}))


@dataclass
class PromptParts:
    """The chat template cut at the question: ``prefix + question + tail + answer``."""

    prefix: str
    tail: str

    @classmethod
    def from_processor(cls, processor) -> PromptParts:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the question exactly once")
        prefix, tail = text.split(_SENTINEL)
        if getattr(processor, "image_token", "<|image_pad|>") not in prefix:
            raise ValueError("the chat template does not put the image before the question")
        return cls(prefix, tail)

    def full_text(self, question: str, answer: str = "") -> str:
        return self.prefix + question + self.tail + answer


def _answer_of(q: Query) -> str:
    if q.mode == "score":
        return SCORE_ANSWER_PREFIX
    if q.mode == "force":
        return q.answer or ""
    return ""


@dataclass
class _Prefix:
    cache: Any                 # DynamicCache, batch = images of the chunk
    mask: Any                  # (B, Lp) long
    next_pos: Any              # (B,) long: first text position after the prefix


class _Row(NamedTuple):
    """One question about one image of a prefilled chunk."""

    slot: int      # the image's row in the prefix cache
    image: int     # the image's index in run()'s arguments
    k: int         # the question's index in that image's list
    query: Query


class Engine:
    """Runs :class:`Query` rows against one model + processor (see the module docstring)."""

    def __init__(self, model, processor, batch_size: int = 8, max_rows: int = 32):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # generation needs the last column to be real
        self.batch_size = max(1, int(batch_size))
        self.max_rows = max(1, int(max_rows))
        self.prompt = PromptParts.from_processor(processor)
        self.positions = PositionVocab(self.tokenizer)
        self.control_tokens = control_tokens(self.tokenizer)
        self.level_ids = [word_token_id(self.tokenizer, w) for w in LEVEL_WORDS]
        self.eos_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.inner = model.model  # the multimodal base model under the LM head
        self.lm_head = model.get_output_embeddings()
        params = inspect.signature(self.inner.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device
        self.prefix_consistent = self._check_tokenization()

    # ------------------------------------------------------------------ helpers

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        for v in ([eos] if isinstance(eos, int) else list(eos or [])):
            ids.append(int(v))
        if self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        if not ids:
            raise ValueError("neither the generation config nor the tokenizer defines an eos token")
        return list(dict.fromkeys(ids))

    def check_questions(self, queries: Sequence[Sequence[Query]]) -> None:
        """Refuse a question that holds one of the tokenizer's markup tokens: inside the chat
        template it would be a control token (end the user turn, open an image slot)."""
        for qs in queries:
            for q in qs:
                for token in self.control_tokens:
                    if token in q.question:
                        raise ValueError(f"the question holds the model's control token {token}: "
                                         "questions are plain text")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _check_tokenization(self) -> bool:
        """Prefix and suffix tokenised apart must equal the whole prompt tokenised at once
        (true for Qwen's tokenizers: special tokens and newlines end pre-tokenizer pieces)."""
        q, a = "Which region shows the most severe noise?", "The noise is in the top left of the image."
        whole = self._encode(self.prompt.full_text(q, a))
        parts = self._encode(self.prompt.prefix) + self._encode(q + self.prompt.tail) + self._encode(a)
        if whole != parts:
            log.warning("this tokenizer does not split prompts at the question boundary; "
                        "prefix sharing is off (naive path)")
        return whole == parts

    def _suffix_ids(self, q: Query) -> tuple[list[int], int]:
        """Suffix token ids and how many of them are the (teacher-forced) answer."""
        head = self._encode(q.question + self.prompt.tail)
        ans = self._encode(_answer_of(q)) if _answer_of(q) else []
        return head + ans, len(ans)

    def _forward(self, **kwargs):
        cache = kwargs.pop("cache")
        kwargs[self._cache_kw] = cache
        return self.inner(use_cache=True, **kwargs).last_hidden_state

    def _sub_logits(self, hidden, ids: Sequence[int]):
        """Logits of a few token ids only: hidden @ W[ids].T (+ bias), in float32."""
        w = self.lm_head.weight[list(ids)]
        out = hidden @ w.T
        if getattr(self.lm_head, "bias", None) is not None:
            out = out + self.lm_head.bias[list(ids)]
        return out.float()

    # ------------------------------------------------------------------ shared-prefix path

    def run(self, images: Sequence[Any], queries: Sequence[Sequence[Query]],
            prefix_sharing: bool = True) -> list[list[QueryResult]]:
        """Answer ``queries[i]`` about ``images[i]`` for every i (PIL RGB images)."""
        if len(images) != len(queries):
            raise ValueError("one list of queries per image")
        self.check_questions(queries)
        if not prefix_sharing or not self.prefix_consistent:
            return self._run_naive(images, queries)
        results: list[list[QueryResult | None]] = [[None] * len(qs) for qs in queries]
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(images))))
                chunk = [i for i in chunk if queries[i]]
                if not chunk:
                    continue
                prefix = self._prefill([images[i] for i in chunk])
                rows = [_Row(b, i, k, q) for b, i in enumerate(chunk) for k, q in enumerate(queries[i])]
                # Forced rows carry whole answers (long suffixes): batch them apart. Generating
                # rows are grouped by their cap so short answers are not padded to long ones.
                rows.sort(key=lambda r: (r.query.mode == "force", r.query.mode == "generate" and r.query.max_new_tokens))
                groups: list[list] = []
                for r in rows:
                    key = (r.query.mode == "force", r.query.max_new_tokens if r.query.mode == "generate" else 0)
                    if groups and groups[-1][0] == key and len(groups[-1][1]) < self.max_rows:
                        groups[-1][1].append(r)
                    else:
                        groups.append((key, [r]))
                for _, group in groups:
                    for r, res in zip(group, self._continue(prefix, group)):
                        results[r.image][r.k] = res
                del prefix
        return [[r for r in rs] for rs in results]  # type: ignore[misc]

    def _prefill(self, images: list) -> _Prefix:
        inputs = self.processor(text=[self.prompt.prefix] * len(images), images=images, padding=True,
                                return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        mm = inputs.get("mm_token_type_ids")
        if mm is None:
            mm = (ids == self.model.config.image_token_id).long()
            inputs["mm_token_type_ids"] = mm
        position_ids, _ = self.inner.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=inputs["image_grid_thw"],
                                                    attention_mask=mask)
        cache = DynamicCache(config=self.model.config)
        self._forward(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache,
                      pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                      mm_token_type_ids=mm)
        next_pos = (position_ids.masked_fill(mask[None] == 0, -1)).amax(dim=(0, 2)) + 1
        return _Prefix(cache, mask, next_pos.to(torch.long))

    def _select_cache(self, cache, index):
        """A new cache whose batch rows are ``cache``'s rows at ``index`` (copies)."""
        data = [(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in cache.layers]
        return DynamicCache(data, config=self.model.config)

    def _continue(self, prefix: _Prefix, rows: list[_Row]) -> list[QueryResult]:
        n = len(rows)
        img = torch.tensor([r.slot for r in rows], device=self.device)
        suffixes, n_answer = zip(*(self._suffix_ids(r.query) for r in rows))
        ls = max(len(s) for s in suffixes)
        ids = torch.full((n, ls), self.pad_id, dtype=torch.long)
        smask = torch.zeros((n, ls), dtype=torch.long)
        for j, s in enumerate(suffixes):
            ids[j, ls - len(s):] = torch.tensor(s)
            smask[j, ls - len(s):] = 1
        ids, smask = ids.to(self.device), smask.to(self.device)
        cache = self._select_cache(prefix.cache, img)
        attn = torch.cat([prefix.mask.index_select(0, img), smask], dim=1)
        pos = prefix.next_pos.index_select(0, img)[:, None] + (smask.cumsum(1) - 1).clamp(min=0)
        hidden = self._forward(input_ids=ids, attention_mask=attn, position_ids=pos[None].expand(3, n, ls),
                               cache=cache)
        out: list[QueryResult | None] = [None] * n
        modes = [r.query.mode for r in rows]
        score_rows = [j for j, m in enumerate(modes) if m == "score"]
        if score_rows:
            sel = torch.tensor(score_rows, device=self.device)
            probs = torch.softmax(self._sub_logits(hidden[sel, -1], self.level_ids), dim=-1).cpu().numpy()
            for j, p in zip(score_rows, probs):
                out[j] = QueryResult(level_probs=[float(v) for v in p])
        for j, m in enumerate(modes):
            if m != "force":
                continue
            a = n_answer[j]
            answer_ids = suffixes[j][len(suffixes[j]) - a:]
            # the logits that predict answer token t sit one position before it
            h = hidden[j, ls - a - 1: ls - 1]
            watch = self._sub_logits(h, self.positions.watch_ids).cpu().numpy()
            out[j] = QueryResult(text=rows[j].query.answer, token_ids=list(answer_ids), watch_logits=watch)
        gen_rows = [j for j, m in enumerate(modes) if m == "generate"]
        if gen_rows:
            if len(gen_rows) != n:
                sel = torch.tensor(gen_rows, device=self.device)
                cache.batch_select_indices(sel)
                hidden, attn, pos = hidden.index_select(0, sel), attn.index_select(0, sel), pos.index_select(0, sel)
            caps = [rows[j].query.max_new_tokens for j in gen_rows]
            for j, res in zip(gen_rows, self._decode(cache, hidden[:, -1], attn, pos[:, -1], caps)):
                out[j] = res
        return out  # type: ignore[return-value]

    def _decode(self, cache, last_hidden, attn, last_pos, caps: list[int]) -> list[QueryResult]:
        """Greedy decoding of a batch whose suffix pass is done."""
        m = last_hidden.shape[0]
        steps = max(caps)
        watch_ids = torch.tensor(self.positions.watch_ids, device=self.device)
        eos = torch.tensor(self.eos_ids, device=self.device)
        cap_t = torch.tensor(caps, device=self.device)
        out_tokens = torch.full((m, steps), self.pad_id, dtype=torch.long, device=self.device)
        out_watch = torch.zeros((m, steps, len(self.positions.watch_ids)), dtype=torch.float32, device=self.device)
        finished = torch.zeros(m, dtype=torch.bool, device=self.device)
        active = torch.arange(m, device=self.device)  # global row of each batch row
        logits = self.lm_head(last_hidden).float()
        next_pos = last_pos + 1
        for step in range(steps):
            tokens = logits.argmax(-1)
            out_tokens[active, step] = tokens
            out_watch[active, step] = logits.index_select(1, watch_ids)
            finished[active] |= torch.isin(tokens, eos) | (cap_t[active] <= step + 1)
            if step == steps - 1:
                break
            if step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1:
                keep = (~finished[active]).nonzero().squeeze(1)  # the one host read
                if len(keep) == 0:
                    break
                if step % COMPACT_EVERY == COMPACT_EVERY - 1 and len(keep) < len(active):
                    cache.batch_select_indices(keep)
                    active, tokens = active[keep], tokens[keep]
                    attn, next_pos = attn[keep], next_pos[keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            hidden = self._forward(input_ids=tokens[:, None], attention_mask=self._step_mask(attn),
                                   position_ids=next_pos[None, :, None].expand(3, len(active), 1), cache=cache)
            logits = self.lm_head(hidden[:, -1]).float()
            next_pos = next_pos + 1
        tokens_host = out_tokens.cpu().numpy()
        watch_host = out_watch.cpu().numpy()
        return [self._result(tokens_host[r], watch_host[r], caps[r]) for r in range(m)]

    def _step_mask(self, attn):
        """The attention mask of a one-token decoding step, made 4-D here for SDPA.

        Given a 2-D padding mask, transformers decides at every step whether it can skip the
        mask by reading it on the host (``masking_utils``: is there any padding?), a device
        sync per token; a 4-D mask is used as given. SDPA takes a boolean one (True: attend).
        Other attention implementations keep the 2-D mask: eager wants an additive float
        mask, flash attention a 2-D one.
        """
        if self.model.config._attn_implementation == "sdpa":
            return attn[:, None, None, :].bool()
        return attn

    def _result(self, tokens: np.ndarray, watch: np.ndarray, cap: int) -> QueryResult:
        ids = [int(t) for t in tokens[:cap]]
        end = next((t for t, tid in enumerate(ids) if tid in self.eos_ids), None)
        kept = ids if end is None else ids[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return QueryResult(text=text, token_ids=kept, watch_logits=watch[:len(kept)], finished=end is not None)

    # ------------------------------------------------------------------ naive reference

    def run_naive(self, images: Sequence[Any], queries: Sequence[Sequence[Query]]) -> list[list[QueryResult]]:
        """One processor call and one generate/forward per (image, question): the baseline."""
        self.check_questions(queries)
        return self._run_naive(images, queries)

    def _run_naive(self, images: Sequence[Any], queries: Sequence[Sequence[Query]]) -> list[list[QueryResult]]:
        out: list[list[QueryResult]] = []
        watch_ids = self.positions.watch_ids
        with torch.inference_mode():
            for image, qs in zip(images, queries):
                results = []
                for q in qs:
                    text = self.prompt.full_text(q.question, _answer_of(q))
                    inputs = self.processor(text=[text], images=[image], return_tensors="pt")
                    inputs = {k: v.to(self.device) for k, v in inputs.items()}
                    if q.mode == "generate":
                        gen = GenerationConfig(max_new_tokens=q.max_new_tokens, do_sample=False, num_beams=1,
                                               eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                               output_logits=True, return_dict_in_generate=True)
                        res = self.model.generate(**inputs, generation_config=gen)
                        new = res.sequences[0, inputs["input_ids"].shape[1]:].cpu().numpy()
                        logits = torch.stack([lg[0] for lg in res.logits]).float()
                        watch = logits[:, watch_ids].cpu().numpy()
                        results.append(self._result(new, watch, q.max_new_tokens))
                        continue
                    logits = self.model(**inputs).logits[0].float()
                    if q.mode == "score":
                        p = torch.softmax(logits[-1, self.level_ids], dim=-1).cpu().numpy()
                        results.append(QueryResult(level_probs=[float(v) for v in p]))
                    else:
                        a = len(self._encode(q.answer or ""))
                        seq = inputs["input_ids"].shape[1]
                        watch = logits[seq - a - 1: seq - 1][:, watch_ids].cpu().numpy()
                        ids = inputs["input_ids"][0, seq - a:].tolist()
                        results.append(QueryResult(text=q.answer, token_ids=ids, watch_logits=watch))
                out.append(results)
        return out


__all__ = ["Engine", "Query", "QueryResult", "PromptParts", "MODES"]
