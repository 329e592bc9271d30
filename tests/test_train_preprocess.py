"""Training inputs: a contract row -> token ids and labels (Preprocessor), rows -> a batch
(collate), and the task mix (repeat_factors, _mix). Real rows from the annotation code, the
real processor of the project's tiny Qwen2.5-VL; no Ray (these are the functions Ray Data runs)."""
from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
import pytest

from conftest import REPO
from iqa_spider.config.schemas import TASK_NAMES
from iqa_spider.train.data import _mix, repeat_factors
from iqa_spider.train.preprocess import IGNORE_INDEX, Preprocessor, chat, collate

MAX_PIXELS = 64_000_000


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    """Real contract rows of one bundled photo, from the annotation code (images by image_uri)."""
    from iqa_spider.annotate.pipeline import ShardAnnotator, iter_builtin_photos
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig
    from iqa_spider.images import encode_png

    root = tmp_path_factory.mktemp("preprocess")
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={root / 'in'}", f"output.uri={root / 'out'}", "distort.max_side=64",
                       "distort.variants_per_image=1", "distort.clean_prob=0.0"])
    name, img = next(iter_builtin_photos())
    out = ShardAnnotator(cfg).annotate_source(str(root / "in" / f"{name}.png"), encode_png(img), None, Counter())
    by_task = {}
    for r in out:
        by_task.setdefault(r["task"], r)
    assert {"grounding", "global_desc", "rating"} <= set(by_task)
    assert by_task["grounding"]["image"] is None and by_task["grounding"]["image_uri"]
    return by_task


@pytest.fixture(scope="module")
def pre(tiny_model_dir) -> Preprocessor:
    return Preprocessor(str(tiny_model_dir), max_seq_len=4096, max_pixels=MAX_PIXELS)


def prompt_ids(pre: Preprocessor, row: dict) -> np.ndarray:
    """The ids of the prompt alone (user turn + assistant header), as generation would see it."""
    text = pre.processor.apply_chat_template(chat(row["question"]), add_generation_prompt=True, tokenize=False)
    return pre.processor(text=[text], images=[pre.image_of(row)], return_tensors="np")["input_ids"][0]


def test_labels_mask_the_prompt_and_copy_the_answer(pre, rows):
    tok = pre.processor.tokenizer
    row = rows["grounding"]
    enc = pre.encode(row)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.dtype == labels.dtype == np.int64 and ids.shape == labels.shape
    prompt = prompt_ids(pre, row)
    n = len(prompt)
    assert np.array_equal(ids[:n], prompt)                 # the full chat starts with the prompt
    assert (labels[:n] == IGNORE_INDEX).all()              # no loss on system, image, question, header
    answer = labels[n:] != IGNORE_INDEX
    # the answer and its end-of-turn token are learned as they are; what follows (the template's
    # newline after <|im_end|>) is not
    k = int(answer.sum())
    assert answer[:k].all() and not answer[k:].any()
    assert np.array_equal(labels[n:n + k], ids[n:n + k])
    assert tok.decode(labels[n:n + k].tolist()) == row["answer"] + "<|im_end|>"
    assert labels[n + k - 1] == pre.im_end == tok.convert_tokens_to_ids("<|im_end|>")
    assert len(ids) - (n + k) == 1 and tok.decode(ids[n + k:].tolist()) == "\n"
    # the image: one <|image_pad|> per merged patch, one pixel row per patch
    grid = enc["image_grid_thw"]
    merge = pre.processor.image_processor.merge_size
    assert (ids == tok.convert_tokens_to_ids("<|image_pad|>")).sum() == np.prod(grid) // merge**2
    assert enc["pixel_values"].shape[0] == np.prod(grid) and enc["pixel_values"].dtype == np.float32
    assert enc["task"] == "grounding"


def test_truncation_cuts_the_answer_never_the_prompt(tiny_model_dir, pre, rows):
    row = rows["global_desc"]
    full = pre.encode(row)
    start = len(prompt_ids(pre, row))
    length = len(full["input_ids"])
    assert length - start > 4  # an answer long enough to cut

    def encode(max_seq_len: int):
        return Preprocessor(str(tiny_model_dir), max_seq_len=max_seq_len, max_pixels=MAX_PIXELS).encode(row)

    # exactly at the limit: nothing cut
    same = encode(length)
    assert np.array_equal(same["input_ids"], full["input_ids"]) and np.array_equal(same["labels"], full["labels"])
    # inside the answer: ids and labels cut together, the prompt whole, the first 3 answer tokens kept
    cut = encode(start + 3)
    assert np.array_equal(cut["input_ids"], full["input_ids"][:start + 3])
    assert np.array_equal(cut["labels"], full["labels"][:start + 3])
    assert (cut["labels"][:start] == IGNORE_INDEX).all()
    assert np.array_equal(cut["labels"][start:], full["input_ids"][start:start + 3])
    assert pre.im_end not in cut["labels"]  # a cut answer has no end-of-turn to learn
    assert np.array_equal(cut["pixel_values"], full["pixel_values"])
    # a limit that would leave no answer token (or cut the image): the sample is dropped
    assert encode(start) is None
    assert encode(start - 10) is None
    assert encode(start + 1)["labels"][-1] == full["input_ids"][start]


def numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as Ray Data's numpy batches carry them (object columns; a null binary is None)."""
    return {k: np.array([r[k] for r in rows], dtype=object) for k in ("image", "image_uri", "question", "answer", "task")}


def test_batch_and_collate_keep_tasks_and_answer_positions_consistent(tiny_model_dir, pre, rows):
    import torch
    from transformers import AutoModelForImageTextToText

    bad = dict(rows["rating"], image=b"not an image at all", image_uri=None)
    good = [rows["grounding"], rows["global_desc"], rows["rating"]]
    packed = pre(numpy_batch([good[0], bad, good[1], good[2]]))
    assert list(packed["task"]) == ["grounding", "global_desc", "rating"]  # the unreadable row is dropped
    want = [pre.encode(r) for r in good]

    pad = pre.processor.tokenizer.pad_token_id
    batch = collate(packed, pad)
    lengths = [len(w["input_ids"]) for w in want]
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for i, w in enumerate(want):
        n = lengths[i]
        assert batch["input_ids"][i, :n].tolist() == w["input_ids"].tolist()
        assert batch["labels"][i, :n].tolist() == w["labels"].tolist()
        assert (batch["input_ids"][i, n:] == pad).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
    assert batch["task_id"].tolist() == [TASK_NAMES.index(t) for t in ("grounding", "global_desc", "rating")]
    # answer_pos: every (row, column) whose next token is an answer token, and nothing else
    expected = {(i, k - 1) for i, w in enumerate(want) for k in np.nonzero(w["labels"] != IGNORE_INDEX)[0]}
    got = [tuple(p) for p in batch["answer_pos"].tolist()]
    assert len(got) == len(set(got)) and set(got) == expected
    for i, j in got:
        assert batch["labels"][i, j + 1] == batch["input_ids"][i, j + 1] != pad
    assert len(got) == int((batch["labels"] != IGNORE_INDEX).sum())
    # images: patches of all rows, in row order
    assert torch.equal(batch["pixel_values"], torch.from_numpy(np.concatenate([w["pixel_values"] for w in want])))
    assert batch["image_grid_thw"].tolist() == [w["image_grid_thw"].tolist() for w in want]

    # and the real model takes the batch as it is
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                             "image_grid_thw")})
    assert out.logits.shape[:2] == (3, longest) and torch.isfinite(out.loss)


def test_a_qwen3_batch_trains(tiny_qwen3_model_dir, rows):
    """Qwen3-VL's multimodal RoPE refuses image inputs without mm_token_type_ids: the batch
    carries them (1 on image tokens, 0 on text and padding) and the loss back-propagates."""
    import torch
    from transformers import AutoModelForImageTextToText

    pre3 = Preprocessor(str(tiny_qwen3_model_dir), 1024, MAX_PIXELS)
    batch = collate(pre3(numpy_batch([rows["grounding"], rows["rating"]])), pre3.processor.tokenizer.pad_token_id)
    image_token = pre3.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == image_token).long())
    model = AutoModelForImageTextToText.from_pretrained(str(tiny_qwen3_model_dir))
    inputs = {k: v for k, v in batch.items() if k not in ("task_id", "answer_pos")}
    out = model(**inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.lm_head.weight.grad is not None


# ---------------------------------------------------------------- the task mix

def test_repeat_factors_reach_the_weighted_shares():
    counts = {"grounding": 100, "rating": 50, "global_desc": 30, "local_desc": 0}
    weights = {"grounding": 1.0, "rating": 1.0, "global_desc": 2.0, "local_desc": 5.0, "referring_long": 1.0,
               "referring_short": 0.0}
    f = repeat_factors(counts, weights)
    # tasks without rows or without weight take no share
    assert set(f) == {"grounding", "rating", "global_desc"}
    total = 180  # rows of the tasks that take part; the mix keeps that size
    assert f["grounding"] == pytest.approx(0.25 * total / 100)
    assert f["rating"] == pytest.approx(0.25 * total / 50)
    assert f["global_desc"] == pytest.approx(0.5 * total / 30)
    emitted = {t: f[t] * counts[t] for t in f}
    assert sum(emitted.values()) == pytest.approx(total)
    assert emitted["global_desc"] == pytest.approx(2 * emitted["grounding"]) == pytest.approx(2 * emitted["rating"])
    # weights are shares of the mix, not multipliers of the data: equal weights, equal shares
    eq = repeat_factors({"grounding": 7, "rating": 3}, {"grounding": 1.0, "rating": 1.0})
    assert eq == pytest.approx({"grounding": 5 / 7, "rating": 5 / 3})


def ids_batch(counts: dict[str, int]) -> dict[str, np.ndarray]:
    sids = [hashlib.sha256(f"{t}-{i}".encode()).hexdigest()[:32] for t, n in counts.items() for i in range(n)]
    tasks = [t for t, n in counts.items() for _ in range(n)]
    return {"sample_id": np.array(sids, dtype=object), "task": np.array(tasks, dtype=object),
            "payload": np.arange(len(sids))}


def test_mix_emits_floor_or_ceil_copies_per_row_deterministically():
    counts = {"grounding": 1200, "rating": 400, "global_desc": 300, "local_desc": 100}
    weights = {"grounding": 1.0, "rating": 1.0, "global_desc": 1.5, "local_desc": 0.0}
    f = repeat_factors(counts, weights)
    assert "local_desc" not in f
    batch = ids_batch(counts)
    mixed = _mix(batch, f)
    # every column follows the same rows
    assert list(mixed) == list(batch)
    assert mixed["sample_id"].tolist() == batch["sample_id"][mixed["payload"]].tolist()
    assert mixed["task"].tolist() == batch["task"][mixed["payload"]].tolist()
    copies = Counter(mixed["sample_id"].tolist())
    by_task: Counter = Counter(mixed["task"].tolist())
    for t, n in counts.items():
        sids = batch["sample_id"][batch["task"] == t].tolist()
        if t not in f:
            assert by_task[t] == 0 and not any(copies[s] for s in sids)
            continue
        lo, hi = math.floor(f[t]), math.ceil(f[t])
        assert {copies[s] for s in sids} <= {lo, hi}, t
        assert n * lo <= by_task[t] <= n * hi
        # the fractional part is drawn per row by a hash of its id: close to its expectation
        assert abs(by_task[t] - f[t] * n) <= 0.05 * f[t] * n + 3, (t, by_task[t], f[t] * n)
    assert f["rating"] > 1 > f["grounding"]  # both kinds, up- and down-sampling, are covered
    # shares: grounding : rating : global_desc = 1 : 1 : 1.5 of the mixed rows
    total = sum(by_task.values())
    assert total == pytest.approx(sum(counts[t] for t in f), rel=0.05)
    assert by_task["global_desc"] / total == pytest.approx(1.5 / 3.5, abs=0.03)
    assert by_task["grounding"] / total == pytest.approx(1 / 3.5, abs=0.03)

    # the same rows get the same copies on every call, whatever batch they arrive in
    again = _mix(batch, f)
    assert again["sample_id"].tolist() == mixed["sample_id"].tolist()
    order = np.random.default_rng(0).permutation(len(batch["task"]))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    split_copies = Counter()
    for idx in halves:
        split_copies.update(_mix({k: v[idx] for k, v in batch.items()}, f)["sample_id"].tolist())
    assert split_copies == copies


def test_mix_with_whole_factors_repeats_every_row_exactly():
    batch = ids_batch({"rating": 10, "grounding": 10})
    mixed = _mix(batch, {"rating": 3.0, "grounding": 1.0})
    copies = Counter(zip(mixed["task"].tolist(), mixed["sample_id"].tolist()))
    assert len(copies) == 20
    assert all(c == (3 if t == "rating" else 1) for (t, _), c in copies.items())
    assert len(_mix(batch, {})["task"]) == 0  # a task with no factor is left out


def test_an_elongated_or_corrupt_image_drops_its_sample_not_the_stream(pre, caplog):
    """The Qwen-VL processor raises ValueError past 200:1; preprocessing must drop that one row."""
    from iqa_spider.images import encode_png

    rng = np.random.default_rng(0)
    images = [encode_png(rng.integers(0, 255, (10, 3000, 3), dtype=np.uint8)), b"\x89PNG\r\n\x1a\nbroken",
              encode_png(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))]
    batch = {"image": np.array(images, dtype=object), "image_uri": np.array(["a", "b", "c"], dtype=object),
             "question": np.array(["How is the quality?"] * 3, dtype=object),
             "answer": np.array(["The quality is good."] * 3, dtype=object),
             "task": np.array(["rating", "rating", "global_desc"], dtype=object)}
    with caplog.at_level("WARNING"):
        out = pre(batch)
    assert list(out["task"]) == ["global_desc"] and len(out["input_ids"]) == 1
    assert "bad_aspect_ratio" in caplog.text or "elongated" in caplog.text
