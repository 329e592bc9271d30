"""Can the model see a distortion at all? A held-out check of the vision path, per learning rate and shape.

`make quality` trains the whole recipe and showed the small model at chance. This benchmark
asks the narrower question underneath: given whole-image distortions a CNN separates at a
glance (blur, noise, compression, brightening at severity 4-5), does the project's small
Qwen-VL learn to name them from the image? It trains the real model class, through the
project's own preprocessing and collation, in a plain AdamW loop (no Ray: the question is the
model and its learning rates, not the platform), for each vision-tower learning rate given,
and reports held-out accuracy beside chance and a shuffled-image control.

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
import common  # noqa: E402  (sets the offline environment first)

import numpy as np  # noqa: E402

FAMILIES = ("blur", "noise", "compression", "brighten")
QUESTION = "What is wrong with the quality of the whole image?"
TRAIN_PHOTOS = 16
CONTENTS = ("photos", "procedural", "mixed")
SIDE = 224


def make_images(pool: list[np.ndarray], n: int, severities: tuple[int, ...], seed: int,
                families: tuple[str, ...] = FAMILIES):
    """n seeded square crops of the pool's images (round robin), each distorted as a whole by one family."""
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
        buf = io.BytesIO()
        Image.fromarray(D.apply(crop, d, seed=int(rng.integers(1 << 30)))).save(buf, "PNG")
        out.append((buf.getvalue(), k))
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


def encode(pre, items, families: tuple[str, ...], answers_from=None):
    """Preprocessed samples; answers_from pairs each image with another sample's answer (the control)."""
    from iqa_spider.vocab import DISTORTION_TERMS

    rows = []
    for i, (png, k) in enumerate(items):
        label = k if answers_from is None else items[answers_from[i]][1]
        e = pre.encode({"image": png, "image_uri": None, "question": QUESTION, "task": "referring_short",
                        "answer": f"Severe {DISTORTION_TERMS[families[label]]}."})
        e["k"] = label
        rows.append(e)
    return rows


def train_and_test(model_dir: str, train, test, shuffled, lr: float, vision_lr: float, minutes: float,
                   batch: int, seed: int, pad_id: int, family_ids: list[int], warmup_steps: int = 0) -> dict:
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
            for j, item in enumerate(items):
                # the family word: the first answer token that is one of the family terms
                col = next(c for c in (labels[j] != -100).nonzero().flatten().tolist()
                           if int(labels[j, c]) in family_ids)
                hits += int(int(logits[j, col - 1][family_ids].argmax()) == item["k"])
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
    ap.add_argument("--family", default="qwen2_5_vl", choices=("qwen2_5_vl", "qwen3_vl"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(common.REPO / "bench/results/seeing.json"))
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()

    import torch

    from iqa_spider.annotate.pipeline import iter_builtin_photos
    from iqa_spider.model.tiny import init_tiny
    from iqa_spider.model.tokenizer import word_token_id
    from iqa_spider.train.preprocess import Preprocessor
    from iqa_spider.vocab import DISTORTION_TERMS

    torch.set_num_threads(a.threads)
    severities = tuple(int(s) for s in a.severities.split(","))
    from iqa_spider.annotate.distortions import SUBTYPES

    families = tuple(SUBTYPES) if a.families == "all" else tuple(a.families.split(","))
    unknown = set(families) - set(SUBTYPES)
    if unknown:
        ap.error(f"--families: unknown {sorted(unknown)}; known: {', '.join(SUBTYPES)}")
    contents = a.train_content.split(",")
    if set(contents) - set(CONTENTS):  # before anything is built: a typo must not cost a run
        ap.error(f"--train-content: unknown {sorted(set(contents) - set(CONTENTS))}; known: {', '.join(CONTENTS)}")
    try:
        shapes = [(name, parse_shape(name)) for name in a.shapes.split(";")]
    except ValueError as e:
        ap.error(f"--shapes: {e}")
    photos = [img for _, img in iter_builtin_photos()]
    test_items = make_images(photos[TRAIN_PHOTOS:], a.test_images, severities, seed=1, families=families)
    perm = list(range(len(test_items)))
    random.Random(2).shuffle(perm)
    majority = max(np.bincount([k for _, k in test_items], minlength=len(families))) / len(test_items)
    train_items = {c: make_images(train_pool(c, photos, a.train_images), a.train_images, severities, seed=0,
                                  families=families) for c in contents}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (shape_name, preset) in enumerate(shapes):
            # a model and a processor per shape: the patch side changes the preprocessing too
            model_dir = str(Path(tmp, f"model{index}"))
            init_tiny(a.family, model_dir, seed=0, size=preset)
            pre = Preprocessor(model_dir, 512, 64_000_000)
            tok = pre.processor.tokenizer
            family_ids = [word_token_id(tok, DISTORTION_TERMS[f]) for f in families]
            test = encode(pre, test_items, families)
            shuffled = encode(pre, test_items, families, answers_from=perm)  # each image asked for another's answer
            for content in contents:
                train = encode(pre, train_items[content], families)
                for v in a.vision_lrs.split(","):
                    run = train_and_test(model_dir, train, test, shuffled, a.lr, float(v), a.minutes, a.batch, 0,
                                         int(tok.pad_token_id or 0), family_ids, a.warmup_steps)
                    runs.append({"shape": shape_name, "train_content": content, **run})
    result = {"task": f"whole-image {'/'.join(families)} at severity {a.severities}", "family": a.family,
              "train_images": a.train_images, "test_images": a.test_images, "chance_majority": majority,
              "chance_uniform": 1 / len(families), "minutes_per_run": a.minutes, "runs": runs}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    for r in runs:
        print(f"{r['shape']}, {r['train_content']}, vision lr {r['vision_lr']:g}: held-out {r['held_out_acc']:.3f}, "
              f"shuffled {r['shuffled_acc']:.3f}, train {r['train_acc']:.3f} after {r['steps']} steps")
    if a.no_record:
        return
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    lines = ["| shape | params | train content | vision lr | LM lr | steps | held-out acc | shuffled control "
             "| train acc | chance (majority / uniform) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['shape']} | {r['params'] / 1e6:.1f} M | {r['train_content']} | {r['vision_lr']:g} "
                     f"| {r['lr']:g} | {r['steps']}"
                     f"{f' ({w} warm-up)' if (w := r.get('warmup_steps')) else ''} | {r['held_out_acc']:.3f} | "
                     f"{r['shuffled_acc']:.3f} | {r['train_acc']:.3f} | {majority:.3f} / {1 / len(families):.3f} |")
    common.record(f"Seeing: can the small {a.family} name a whole-image distortion? "
                  f"({a.minutes:g} min per learning rate)",
                  "\n".join(lines),
                  f"{result['task']}; {a.train_images} train crops of {TRAIN_PHOTOS} photos (photos), of as many "
                  f"generated dead-leaves images (procedural) or half each (mixed); {a.test_images} held-out "
                  f"crops of the other {len(photos) - TRAIN_PHOTOS}; the shuffled control asks each held-out image "
                  f"for another image's answer.")


if __name__ == "__main__":
    main()
