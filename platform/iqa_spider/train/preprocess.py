"""Sample -> model inputs, run in Ray Data on CPU so the training loop only does compute.

A row of the dataset contract becomes one Qwen-VL chat (user: image + question, assistant:
answer) tokenized by the model's own processor. Labels are the token ids of the assistant's
answer (and its end-of-turn token); everything before is -100, so the loss teaches answers,
never prompts. Collation pads text and concatenates the variable number of image patches.
The processor's ``mm_token_type_ids`` (1 on image tokens) travel with the ids: Qwen3-VL's
multimodal RoPE refuses image inputs without them.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from iqa_spider import storage
from iqa_spider.config.schemas import TASK_NAMES
from iqa_spider.images import ImageError, decode_image, prepare_image
from iqa_spider.model.loading import resolve_model_path
from iqa_spider.model.processor import load_processor

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
# Per-sample arrays of varying length, packed as raw bytes for Ray Data (see __call__).
RAGGED = ("input_ids", "labels", "mm_token_type_ids", "pixel_values")


def chat(question: str, answer: str | None = None) -> list[dict]:
    """The conversation of one sample, in the processor's chat-template form."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class Preprocessor:
    """Callable for `Dataset.map_batches`: loads the processor once per Ray Data actor."""

    def __init__(self, model_path: str, max_seq_len: int, max_pixels: int,
                 min_image_pixels: int | None = None, max_image_pixels: int | None = None):
        local = resolve_model_path(model_path).local_dir  # s3:// models: one copy per node
        self.processor = load_processor(local, min_image_pixels, max_image_pixels)
        tok = self.processor.tokenizer
        self.max_seq_len, self.max_pixels = max_seq_len, max_pixels
        # "<|im_start|>assistant\n": where the answer starts, found in the ids of the full chat.
        self.assistant_header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")

    def image_of(self, row: dict) -> Any:
        data = row.get("image")
        # A null binary cell reaches numpy batches as None or NaN, not as empty bytes.
        if not isinstance(data, (bytes, bytearray, memoryview)):
            data = storage.read_with_retry(str(row["image_uri"]))
        # prepare_image refuses what the processor would raise on (aspect ratio over 150:1) as an
        # ImageError, so one odd photo drops its sample instead of failing the whole stream.
        return prepare_image(decode_image(data, self.max_pixels))

    def encode(self, row: dict) -> dict | None:
        image = self.image_of(row)
        text = self.processor.apply_chat_template(chat(row["question"], row["answer"]), tokenize=False)
        enc = self.processor(text=[text], images=[image], return_tensors="np")
        ids = enc["input_ids"][0].astype(np.int64)
        start = _find_last(ids, self.assistant_header)
        if start < 0:
            raise ValueError("chat template produced no assistant turn")
        start += len(self.assistant_header)
        labels = np.full_like(ids, IGNORE_INDEX)
        end = _find_last(ids, [self.im_end]) + 1  # train up to the end-of-turn token, not the newline after it
        labels[start:end] = ids[start:end]
        mm_types = enc["mm_token_type_ids"][0].astype(np.int64)
        if len(ids) > self.max_seq_len:
            if start >= self.max_seq_len:  # cutting would remove image tokens or the whole answer
                return None
            ids, labels, mm_types = ids[: self.max_seq_len], labels[: self.max_seq_len], mm_types[: self.max_seq_len]
        return {
            "input_ids": ids,
            "labels": labels,
            "mm_token_type_ids": mm_types,
            "pixel_values": enc["pixel_values"].astype(np.float32),
            "image_grid_thw": enc["image_grid_thw"][0].astype(np.int64),
            "task": row["task"],
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encoded = []
        n = len(batch["task"])
        for i in range(n):
            row = {k: batch[k][i] for k in ("image", "image_uri", "question", "answer", "task")}
            try:
                enc = self.encode(row)
            except (ImageError, *storage.transient_errors()) as exc:  # as in every job that reads images
                log.warning("dropped a %s sample: %s", row["task"], exc)
                continue
            if enc is None:
                log.warning("dropped a %s sample longer than max_seq_len=%d before its answer",
                            row["task"], self.max_seq_len)
                continue
            encoded.append(enc)
        return pack(encoded)


def pack(encoded: list[dict]) -> dict[str, np.ndarray]:
    """Samples from :meth:`Preprocessor.encode` -> one block, the input of :func:`collate`.

    Ragged arrays travel as raw bytes: Ray Data's tensor columns cannot mix the fixed- and
    variable-shaped blocks that images of equal and unequal sizes produce.
    """
    packed = {k: np.array([np.ascontiguousarray(e[k]).tobytes() for e in encoded], dtype=object) for k in RAGGED}
    packed["image_grid_thw"] = np.array([e["image_grid_thw"] for e in encoded], dtype=np.int64).reshape(-1, 3)
    packed["task"] = np.array([e["task"] for e in encoded], dtype=object)
    return packed


def _find_last(ids: np.ndarray, pattern: list[int]) -> int:
    n = len(pattern)
    for i in range(len(ids) - n, -1, -1):
        if list(ids[i:i + n]) == pattern:
            return i
    return -1


def collate(batch: dict[str, np.ndarray], pad_token_id: int) -> dict[str, Any]:
    """A batch of preprocessed rows -> model kwargs (right padding for training)."""
    import torch

    seqs = [np.frombuffer(b, dtype=np.int64) for b in batch["input_ids"]]
    labs = [np.frombuffer(b, dtype=np.int64) for b in batch["labels"]]
    kinds = [np.frombuffer(b, dtype=np.int64) for b in batch["mm_token_type_ids"]]
    grids = np.asarray(batch["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    mm_token_type_ids = torch.zeros((len(seqs), length), dtype=torch.long)  # padding is text (0)
    for i, (s, lab, k) in enumerate(zip(seqs, labs, kinds)):
        input_ids[i, : len(s)] = torch.from_numpy(s.copy())
        labels[i, : len(lab)] = torch.from_numpy(lab.copy())
        mm_token_type_ids[i, : len(k)] = torch.from_numpy(k.copy())
        attention[i, : len(s)] = 1
    # Each image contributes t*h*w patch rows; their width is the processor's patch size.
    patches = [np.frombuffer(b, dtype=np.float32).reshape(int(np.prod(g)), -1)
               for b, g in zip(batch["pixel_values"], grids)]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "mm_token_type_ids": mm_token_type_ids,
            "pixel_values": torch.from_numpy(np.concatenate(patches)), "image_grid_thw": torch.from_numpy(grids),
            # The loss's bookkeeping, found here on the host so that the loss on the device never
            # has to look: each sample's task as its index in TASK_NAMES, and the (row, column)
            # of every position that predicts an answer token.
            "task_id": torch.tensor([TASK_NAMES.index(str(t)) for t in batch["task"]], dtype=torch.long),
            "answer_pos": (labels[:, 1:] != IGNORE_INDEX).nonzero()}
