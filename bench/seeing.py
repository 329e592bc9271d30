"""Can the model see a distortion at all? A held-out check of the vision path, per learning rate and shape.

`make quality` trains the whole recipe and showed the small model at chance. This benchmark
asks the narrower question underneath: given whole-image distortions a CNN separates at a
glance (blur, noise, compression, brightening at severity 4-5), does the project's small
Qwen-VL (the small preset's own class, a Qwen3-VL, unless `--family` names another) learn to
name them from the image? It trains the real model class, through the project's own
preprocessing and collation, in a plain AdamW loop (no Ray: the question is the model and its
learning rates, not the platform), for each vision-tower learning rate given, and reports
held-out accuracy beside chance and a shuffled-image control.

Sources are split by photo: the test crops come from 6 bundled photos; the train crops from the
other 16, or (`--train-content procedural`) each from a generated dead-leaves image of its own,
or half each (`mixed`), which asks whether more distinct contents help more than more views of
the same few. Run from the repo root:
    .venv/bin/python bench/seeing.py --minutes 6 --vision-lrs 3e-3,1e-4
    .venv/bin/python bench/seeing.py --minutes 6 --vision-lrs 1e-4 --families all \
        --train-content photos,procedural,mixed --out bench/results/seeing_content.json
    .venv/bin/python bench/seeing.py --minutes 6 --vision-lrs 1e-4 --families all \
        --shapes 'vision_patch=7;vision_hidden=256,vision_intermediate=1024' --out bench/results/seeing_shape.json

`--shapes` compares vision towers (or any field of the small preset): each shape gets its own
model and processor, trained for the same minutes, so a costlier shape pays in steps.

`--task where` asks the other half of the question: where is the damage? Each crop is distorted
in one quadrant, or (`--whole-share`) over the whole image, and the model answers the position
("The top left region of the image.", "The whole image."). `--family qwen2_5_vl,qwen3_vl`
compares the two model classes at the same preset sizes:
    .venv/bin/python bench/seeing.py --task where --family qwen2_5_vl,qwen3_vl --minutes 5 \
        --vision-lrs 1e-4 --families darken,saturate_weaken --train-images 1200 --test-images 200
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np

import common
from iqa_spider.model.tiny import DEFAULT_FAMILY

FAMILIES = ("blur", "noise", "compression", "brighten")
QUESTION = "What is wrong with the quality of the whole image?"
WHERE_QUESTION = "Which region of the image is the most distorted?"
TASKS = ("name", "where")
# --task where: the quadrants' words (vertical, horizontal) by index, and the whole image last.
QUADRANTS = (("top", "left"), ("top", "right"), ("bottom", "left"), ("bottom", "right"))
WHOLE = len(QUADRANTS)
TRAIN_PHOTOS = 16
CONTENTS = ("photos", "procedural", "mixed")
SIDE = 224


def make_images(pool: list[np.ndarray], n: int, severities: tuple[int, ...], seed: int,
                families: tuple[str, ...] = FAMILIES, whole_share: float | None = None):
    """n seeded square crops of the pool's images (round robin), each distorted by one family:
    as a whole, labelled by the family's index (``whole_share`` None: the name task); or, for the
    where task, over the whole image with probability ``whole_share`` (label WHOLE) and else in one
    quadrant (label: its index in QUADRANTS)."""
    from PIL import Image

    from iqa_spider.annotate import distortions as D

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = pool[i % len(pool)]
        h, w = src.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = np.asarray(Image.fromarray(src[y:y + side, x:x + side]).resize((SIDE, SIDE)))
        k = int(rng.integers(len(families)))
        family = families[k]
        d = D.Distortion(family, D.SUBTYPES[family][0], int(rng.choice(severities)))
        if whole_share is None:
            image, label = D.apply(crop, d, seed=int(rng.integers(1 << 30))), k
        else:
            mask = np.ones((SIDE, SIDE), bool)
            label = WHOLE if rng.random() < whole_share else int(rng.integers(len(QUADRANTS)))
            if label != WHOLE:
                half = SIDE // 2
                top, left = half * (label // 2), half * (label % 2)
                mask[:] = False
                mask[top:top + half, left:left + half] = True
            image = D.apply_in_region(crop, mask, [d], seed=int(rng.integers(1 << 30)))
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")
        out.append((buf.getvalue(), label))
    return out


def train_pool(content: str, photos: list[np.ndarray], n: int) -> list[np.ndarray]:
    """The pristine images the train crops come from: the train photos, n generated dead-leaves
    images (one per crop: a new content each time), or both, half and half."""
    from iqa_spider.annotate.procedural import dead_leaves

    if content == "photos":
        return photos[:TRAIN_PHOTOS]
    leaves = [dead_leaves(np.random.default_rng([7, i]), 256) for i in range(n if content == "procedural" else n // 2)]
    if content == "procedural":
        return leaves
    # mixed: alternate, so the round robin takes a generated crop and a photo one in turn
    return [img for pair in zip(leaves, itertools.cycle(photos[:TRAIN_PHOTOS])) for img in pair]


def parse_shape(text: str):
    """'small', or comma-separated key=value overrides of the small preset's fields."""
    import dataclasses

    from iqa_spider.model.tiny import PRESETS

    base = PRESETS["small"]
    if text.strip() == "small":
        return base
    fields = [f.name for f in dataclasses.fields(base)]
    overrides = {}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        key = key.strip()
        if key not in fields or not value:
            raise ValueError(f"{pair!r} is not key=value with a key of {', '.join(fields)}")
        overrides[key] = float(value) if key == "lm_head_std" else int(value)
    return dataclasses.replace(base, **overrides)


def answer_of(task: str, label: int, families: tuple[str, ...]) -> tuple[str, str]:
    """(question, answer) of a sample of ``task`` with this label."""
    from iqa_spider.vocab import DISTORTION_TERMS

    if task == "name":
        return QUESTION, f"Severe {DISTORTION_TERMS[families[label]]}."
    if label == WHOLE:
        return WHERE_QUESTION, "The whole image."
    return WHERE_QUESTION, f"The {' '.join(QUADRANTS[label])} region of the image."


def encode(pre, items, families: tuple[str, ...], answers_from=None, task: str = "name"):
    """Preprocessed samples; answers_from pairs each image with another sample's answer (the control)."""
    rows = []
    for i, (png, k) in enumerate(items):
        label = k if answers_from is None else items[answers_from[i]][1]
        question, answer = answer_of(task, label, families)
        e = pre.encode({"image": png, "image_uri": None, "question": question, "task": "referring_short",
                        "answer": answer})
        e["k"] = label
        rows.append(e)
    return rows


def decision_words(tok, task: str, families: tuple[str, ...]) -> list[list[int]]:
    """The answer's decisions as sets of token ids: at each answer token that is in one of the
    sets, the model's choice is its argmax within that set. Name: the family word. Where: the
    vertical word or 'whole', then the horizontal word."""
    from iqa_spider.model.tokenizer import word_token_id
    from iqa_spider.vocab import DISTORTION_TERMS

    if task == "name":
        return [[word_token_id(tok, DISTORTION_TERMS[f]) for f in families]]
    return [[word_token_id(tok, w) for w in ("top", "bottom", "whole")],
            [word_token_id(tok, w) for w in ("left", "right")]]


def train_and_test(model_dir: str, train, test, shuffled, lr: float, vision_lr: float, minutes: float,
                   batch: int, seed: int, pad_id: int, decisions: list[list[int]], warmup_steps: int = 0) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText

    from iqa_spider.model.tiny import count_parameters
    from iqa_spider.train.preprocess import collate, pack
    from iqa_spider.train.recipe import is_vision

    torch.manual_seed(seed)
    rnd = random.Random(seed)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    vision = [p for n, p in model.named_parameters() if is_vision(n)]
    language = [p for n, p in model.named_parameters() if not is_vision(n)]
    opt = torch.optim.AdamW([{"params": language, "lr": lr}, {"params": vision, "lr": vision_lr}], weight_decay=0.0)
    # a linear warm-up of both rates (a ViT from scratch is known to need one at higher rates)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))

    def batch_of(items):
        out = collate(pack(items), pad_id)
        return out.pop("labels"), out.pop("answer_pos"), {k: v for k, v in out.items() if k != "task_id"}

    @torch.no_grad()
    def accuracy(data):
        model.eval()
        hits = 0
        for i in range(0, len(data), 16):
            items = data[i:i + 16]
            labels, _, inputs = batch_of(items)
            logits = model(**inputs).logits
            for j in range(len(items)):
                # right when, at every answer token that is a decision (a family word; a position
                # word), the argmax among that decision's words is the true one
                right = True
                for col in (labels[j] != -100).nonzero().flatten().tolist():
                    truth = int(labels[j, col])
                    for ids in decisions:
                        if truth in ids:
                            right &= ids[int(logits[j, col - 1][ids].argmax())] == truth
                hits += int(right)
        model.train()
        return hits / len(data)

    curve, steps, started = [], 0, time.monotonic()
    next_eval = 60.0
    while time.monotonic() - started < minutes * 60:
        labels, pos, inputs = batch_of(rnd.sample(train, batch))
        logits = model(**inputs).logits
        rows, cols = pos.unbind(1)
        loss = torch.nn.functional.cross_entropy(logits[rows, cols], labels[rows, cols + 1])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps += 1
        if time.monotonic() - started >= next_eval:
            next_eval += 60.0
            curve.append({"minute": round((time.monotonic() - started) / 60, 1), "step": steps,
                          "held_out_acc": round(accuracy(test), 3)})
            print(f"vision lr {vision_lr:g}: {curve[-1]}", flush=True)
    return {"params": count_parameters(model), "lr": lr, "vision_lr": vision_lr, "warmup_steps": warmup_steps,
            "steps": steps, "samples": steps * batch,
            "held_out_acc": accuracy(test), "shuffled_acc": accuracy(shuffled),
            "train_acc": accuracy(train[:len(test)]), "curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training time per learning rate")
    ap.add_argument("--vision-lrs", default="3e-3,1e-4", help="vision-tower learning rates to compare")
    ap.add_argument("--train-content", default="photos",
                    help="comma-separated train sources to compare: photos (the 16 train photos), procedural "
                         "(a generated dead-leaves image per crop), mixed (half each); the test crops are always "
                         "of the held-out photos")
    ap.add_argument("--shapes", default="small",
                    help="semicolon-separated model shapes to compare: 'small' (the preset) or comma-separated "
                         "overrides of its fields, e.g. 'vision_patch=7;vision_hidden=256,vision_intermediate=1024'")
    ap.add_argument("--lr", type=float, default=1e-3, help="language-model learning rate")
    ap.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up of both learning rates")
    ap.add_argument("--train-images", type=int, default=600)
    ap.add_argument("--test-images", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--severities", default="4,5")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help="comma-separated distortion families, or 'all' (the annotator's 12)")
    ap.add_argument("--family", default=DEFAULT_FAMILY["small"],
                    help="comma-separated model classes to compare: qwen2_5_vl, qwen3_vl (the presets' sizes; "
                         "default: the small preset's own; the sections before 2026-12-07 ran qwen2_5_vl)")
    ap.add_argument("--task", default="name", choices=TASKS,
                    help="name: which family damages the whole image; where: which quadrant (or the whole image)")
    ap.add_argument("--whole-share", type=float, default=0.2, help="--task where: the share of whole-image damage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.REPO / "bench/results/seeing.json"))
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    from iqa_spider.annotate.distortions import SUBTYPES
    from iqa_spider.model.tiny import FAMILIES as MODEL_FAMILIES

    # every argument checked before anything is built: a typo must not cost a run
    severities = tuple(int(s) for s in a.severities.split(","))
    families = tuple(SUBTYPES) if a.families == "all" else tuple(a.families.split(","))
    unknown = set(families) - set(SUBTYPES)
    if unknown:
        ap.error(f"--families: unknown {sorted(unknown)}; known: {', '.join(SUBTYPES)}")
    model_families = a.family.split(",")
    if set(model_families) - set(MODEL_FAMILIES):
        ap.error(f"--family: unknown {sorted(set(model_families) - set(MODEL_FAMILIES))}; "
                 f"known: {', '.join(MODEL_FAMILIES)}")
    contents = a.train_content.split(",")
    if set(contents) - set(CONTENTS):
        ap.error(f"--train-content: unknown {sorted(set(contents) - set(CONTENTS))}; known: {', '.join(CONTENTS)}")
    try:
        shapes = [(name, parse_shape(name)) for name in a.shapes.split(";")]
    except ValueError as e:
        ap.error(f"--shapes: {e}")

    import torch

    from iqa_spider.annotate.pipeline import iter_builtin_photos
    from iqa_spider.model.tiny import init_tiny
    from iqa_spider.train.preprocess import Preprocessor

    torch.set_num_threads(a.threads)
    whole_share = a.whole_share if a.task == "where" else None
    photos = [img for _, img in iter_builtin_photos()]
    test_items = make_images(photos[TRAIN_PHOTOS:], a.test_images, severities, seed=1, families=families,
                             whole_share=whole_share)
    perm = list(range(len(test_items)))
    random.Random(2).shuffle(perm)
    classes = len(families) if a.task == "name" else len(QUADRANTS) + 1
    majority = max(np.bincount([k for _, k in test_items], minlength=classes)) / len(test_items)
    train_items = {c: make_images(train_pool(c, photos, a.train_images), a.train_images, severities, seed=0,
                                  families=families, whole_share=whole_share) for c in contents}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in model_families:
            for index, (shape_name, preset) in enumerate(shapes):
                # a model and a processor per shape: the patch side changes the preprocessing too
                model_dir = str(Path(tmp, f"{family}-model{index}"))
                init_tiny(family, model_dir, seed=0, size=preset)
                pre = Preprocessor(model_dir, 512, 64_000_000)
                tok = pre.processor.tokenizer
                decisions = decision_words(tok, a.task, families)
                test = encode(pre, test_items, families, task=a.task)
                # each image asked for another's answer
                shuffled = encode(pre, test_items, families, answers_from=perm, task=a.task)
                for content in contents:
                    train = encode(pre, train_items[content], families, task=a.task)
                    for v in a.vision_lrs.split(","):
                        run = train_and_test(model_dir, train, test, shuffled, a.lr, float(v), a.minutes, a.batch,
                                             0, int(tok.pad_token_id or 0), decisions, a.warmup_steps)
                        runs.append({"model": family, "shape": shape_name, "train_content": content, **run})
    where = ("whole-image" if a.task == "name"
             else f"one quadrant or ({a.whole_share:g} of the crops) the whole image, damaged by")
    result = {"task": f"{a.task}: {where} {'/'.join(families)} at severity {a.severities}", "families": model_families,
              "train_images": a.train_images, "test_images": a.test_images, "chance_majority": majority,
              "chance_uniform": 1 / classes, "minutes_per_run": a.minutes, "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for r in runs:
        print(f"{r['model']}, {r['shape']}, {r['train_content']}, vision lr {r['vision_lr']:g}: held-out "
              f"{r['held_out_acc']:.3f}, shuffled {r['shuffled_acc']:.3f}, train {r['train_acc']:.3f} "
              f"after {r['steps']} steps")
    if a.no_record:
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    lines = ["| model | shape | params | train content | vision lr | LM lr | steps | held-out acc | shuffled control "
             "| train acc | chance (majority / uniform) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['model']} | {r['shape']} | {r['params'] / 1e6:.1f} M | {r['train_content']} "
                     f"| {r['vision_lr']:g} | {r['lr']:g} | {r['steps']}"
                     f"{f' ({w} warm-up)' if (w := r.get('warmup_steps')) else ''} | {r['held_out_acc']:.3f} | "
                     f"{r['shuffled_acc']:.3f} | {r['train_acc']:.3f} | {majority:.3f} / {1 / classes:.3f} |")
    question = "name a whole-image distortion" if a.task == "name" else "say where the distortion is"
    common.record(f"Seeing: can the small {'/'.join(model_families)} {question}? ({a.minutes:g} min per run)",
                  "\n".join(lines),
                  f"{result['task']}; {a.train_images} train crops of {TRAIN_PHOTOS} photos (photos), of as many "
                  f"generated dead-leaves images (procedural) or half each (mixed); {a.test_images} held-out "
                  f"crops of the other {len(photos) - TRAIN_PHOTOS}; the shuffled control asks each held-out image "
                  f"for another image's answer.")


if __name__ == "__main__":
    main()
