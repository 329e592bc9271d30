"""The annotation job's other region sources (tiny SAM, the user's masks) and the MOS import."""
import csv
import io
import itertools
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import BIN, REPO
from iqa_spider import storage
from iqa_spider.annotate.importers.mos_table import import_mos
from iqa_spider.annotate.pipeline import iter_builtin_photos, run_annotate
from iqa_spider.annotate.regions import SamRegions
from iqa_spider.annotate.truth import LEVEL_LOWER_BOUNDS
from iqa_spider.config import load_config
from iqa_spider.config.schemas import AnnotateConfig
from iqa_spider.data import rle
from iqa_spider.data.io import read_dataset
from iqa_spider.images import decode_image, encode_png, resize_max_side
from iqa_spider.vocab import LEVEL_WORDS, SCORE_ANSWER_PREFIX, SCORE_QUESTION

MAX_SIDE = 128


def small_photos(n: int) -> list[tuple[str, np.ndarray]]:
    """Bundled photos already at MAX_SIDE or smaller, so the job does not resize them."""
    out = []
    for name, img in itertools.islice(iter_builtin_photos(), n):
        out.append((name, np.asarray(resize_max_side(decode_image(encode_png(img)), MAX_SIDE))))
    return out


def config(inp: str, out: str, *overrides: str) -> AnnotateConfig:
    return load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                       [f"input.uri={inp}", f"output.uri={out}", f"distort.max_side={MAX_SIDE}",
                        "output.shard_size=1", "distort.whole_image_prob=0.0", "distort.clean_prob=0.0",
                        *overrides])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, int((a | b).sum()))


# ---------------------------------------------------------------- SAM regions

def test_sam_regions_are_disjoint_bool_masks_of_the_image_shape(tiny_sam_dir):
    (_, image), = small_photos(1)
    proposals = SamRegions(str(tiny_sam_dir))(image)
    assert len(proposals) >= 3  # the random model needs the relaxed pass, and gets there
    claimed = np.zeros(image.shape[:2], int)
    for p in proposals:
        assert p.mask.dtype == bool and p.mask.shape == image.shape[:2]
        assert p.mask.mean() >= 0.02
        claimed += p.mask
    assert claimed.max() == 1  # no pixel in two regions
    areas = [int(p.mask.sum()) for p in proposals]
    assert areas == sorted(areas, reverse=True)


def test_annotate_with_tiny_sam(tmp_path, tiny_sam_dir, ray_local):
    photos = small_photos(2)
    for name, img in photos:
        storage.write_bytes(str(tmp_path / "in" / f"{name}.png"), encode_png(img))
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out"), "regions.method=sam", f"regions.sam_path={tiny_sam_dir}")
    summary = run_annotate(cfg)
    assert summary["annotated"] == 2 and summary["skipped"] == {}
    table = read_dataset(cfg.output.uri)  # validates the contract
    assert table.num_rows == summary["samples"] > 0
    # The regions of the targets are SAM's (not the superpixel fallback's), made with the
    # job's own region settings.
    rc = cfg.regions
    sam = SamRegions(str(tiny_sam_dir), rc.max_regions, rc.min_area_frac, min_regions=rc.min_regions)
    expected = {str(tmp_path / "in" / f"{name}.png"): [p.mask for p in sam(img)] for name, img in photos}
    for row in table.to_pylist():
        got = [rle.decode(r["mask_rle"]) for r in row["target"]["regions"]]
        want = expected[row["source_uri"]]
        assert rc.min_regions <= len(got) == len(want) <= rc.max_regions
        assert all(iou(g, w) > 0.95 for g, w in zip(got, want))
        assert all(g.mean() >= rc.min_area_frac for g in got)


# ---------------------------------------------------------------- the user's masks

LABELS = ("sky", "meadow", "house")


def three_masks(h: int, w: int) -> list[np.ndarray]:
    top = np.zeros((h, w), bool)
    top[: h // 2] = True
    left = np.zeros((h, w), bool)
    left[h // 2:, : w // 3] = True
    right = np.zeros((h, w), bool)
    right[h // 2:, w // 3:] = True
    return [top, left, right]


def test_annotate_with_user_masks(tmp_path, ray_local):
    manifest_rows, given = [], {}
    for name, img in small_photos(2):
        uri = str(tmp_path / "in" / f"{name}.png")
        storage.write_bytes(uri, encode_png(img))
        masks = three_masks(*img.shape[:2])
        given[uri] = masks
        manifest_rows.append({"image_uri": uri, "masks": [{"mask_rle": rle.encode(m), "label": label}
                                                          for m, label in zip(masks, LABELS)]})
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(manifest_rows), manifest)
    cfg = config(str(manifest), str(tmp_path / "out"), "regions.method=masks")
    summary = run_annotate(cfg)
    assert summary["sources"] == 2 and summary["annotated"] == 2 and summary["skipped"] == {}
    table = read_dataset(cfg.output.uri)
    seen_labels = set()
    for row in table.to_pylist():
        regions = row["target"]["regions"]
        assert [r["label"] for r in regions] == list(LABELS)
        for r, mask in zip(regions, given[row["source_uri"]]):
            assert np.array_equal(rle.decode(r["mask_rle"]), mask)
        if row["task"] in ("local_desc", "referring_short", "referring_long"):
            (rid,) = row["target"]["target_region_ids"]
            region = next(r for r in regions if r["region_id"] == rid)
            vertical, horizontal = region["position"]
            assert f"the {region['label']} in the {vertical} {horizontal} of the image" in row["question"]
        for label in LABELS:
            if f"the {label} in the" in row["answer"] or f"the {label} in the" in row["question"]:
                seen_labels.add(label)
    assert len(seen_labels) >= 2


# ---------------------------------------------------------------- MOS import

# MOS on 0..100 -> score 1 + 4 * mos / 100; 80 and 60 and 20 land exactly on bin edges.
GOOD = {"a.png": (80.0, 4.2, "excellent"), "b.png": (60.0, 3.4, "good"), "c.png": (20.0, 1.8, "poor")}


def level_by_bins(score: float) -> str:
    return next((w for w, lo in zip(LEVEL_WORDS, LEVEL_LOWER_BOUNDS) if score >= lo), LEVEL_WORDS[-1])


def write_mos_inputs(base: str) -> str:
    photos = small_photos(3)
    for (fname, _), (_, img) in zip(GOOD.items(), photos):
        storage.write_bytes(storage.join(base, "img", fname), encode_png(img))
    good = encode_png(photos[0][1])
    storage.write_bytes(storage.join(base, "img", "corrupt.png"), good[: len(good) // 3])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "mos"])
    for fname, (mos, _, _) in GOOD.items():
        writer.writerow([fname, mos])
    writer.writerow(["missing.png", 50.0])
    writer.writerow(["corrupt.png", 50.0])
    table = storage.join(base, "mos.csv")
    storage.write_bytes(table, buf.getvalue().encode())
    return table


def check_mos_output(out: str, images: str) -> None:
    table = read_dataset(out)  # validates the contract
    assert table.num_rows == 3
    by_uri = {r["image_uri"]: r for r in table.to_pylist()}
    for fname, (_, score, level) in GOOD.items():
        row = by_uri[storage.join(images, fname)]
        assert row["task"] == "rating" and row["subtask"] is None
        assert row["question"] == SCORE_QUESTION and row["answer"] == f"{SCORE_ANSWER_PREFIX} {level}."
        assert row["target"]["quality_score"] == pytest.approx(score)
        assert row["target"]["quality_level"] == level == level_by_bins(score)
        assert row["width"] == MAX_SIDE or row["height"] == MAX_SIDE


def test_import_mos_local(tmp_path):
    table = write_mos_inputs(str(tmp_path))
    images, out = str(tmp_path / "img"), str(tmp_path / "out")
    summary = import_mos(table, images, out, scale_min=0, scale_max=100)
    assert summary["rows"] == 5 and summary["imported"] == 3
    assert summary["skipped"] == {"unreadable": 1, "corrupt": 1}
    check_mos_output(out, images)


def test_import_mos_on_s3(moto_s3):
    base = moto_s3.uri("mos")
    table = write_mos_inputs(base)
    summary = import_mos(table, storage.join(base, "img"), storage.join(base, "out"), scale_min=0, scale_max=100)
    assert summary["imported"] == 3 and summary["skipped"] == {"unreadable": 1, "corrupt": 1}
    assert summary["output"].startswith("s3://")
    check_mos_output(storage.join(base, "out"), storage.join(base, "img"))


def test_import_mos_cli(tmp_path):
    table = write_mos_inputs(str(tmp_path))
    images, out = str(tmp_path / "img"), str(tmp_path / "out")
    proc = subprocess.run([str(BIN / "iqa-spider"), "data", "import-mos", "--table", table, "--images", images,
                           "--output", out, "--scale-min", "0", "--scale-max", "100"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported 3 rating samples" in proc.stdout
    check_mos_output(out, images)


def test_import_mos_odd_rows(tmp_path):
    """Empty MOS, a repeated image and a name that looks like a number never stop the import."""
    (_, img), = small_photos(1)
    storage.write_bytes(str(tmp_path / "img" / "0001.png"), encode_png(img))
    (tmp_path / "mos.csv").write_text("filename,MOS\n0001.png,4.5\n0001.png,4.5\nx.png,\n,3\n")
    summary = import_mos(str(tmp_path / "mos.csv"), str(tmp_path / "img"), str(tmp_path / "out.parquet"))
    assert summary["imported"] == 1
    assert summary["skipped"] == {"duplicate": 1, "no_mos": 1, "no_image": 1}
    (row,) = read_dataset(str(tmp_path / "out.parquet")).to_pylist()
    assert row["target"]["quality_level"] == "excellent" and row["target"]["quality_score"] == 4.5


# ---------------------------------------------------------------- rewrite stage

def test_rewrite_stage_in_the_job(tmp_path, tiny_model_dir):
    """rewrite.enabled: the answers of the rewritten tasks go through the model, the truth
    check keeps a faithful paraphrase and rejects one that adds a distortion, the template
    answer stays where it was rejected, targets never change, and the summary counts both."""
    from iqa_spider.annotate.pipeline import REWRITTEN_TASKS, ShardAnnotator, plan_shards
    from iqa_spider.annotate.rewrite import keeps_truth

    (name, img), = small_photos(1)
    src = str(tmp_path / "in" / f"{name}.png")
    storage.write_bytes(src, encode_png(img))
    one = "distort.variants_per_image=1"
    plain_cfg = config(str(tmp_path / "in"), str(tmp_path / "plain"), one)
    cfg = config(str(tmp_path / "in"), str(tmp_path / "rewritten"), one, "rewrite.enabled=true",
                 f"rewrite.model_path={tiny_model_dir}", "rewrite.max_new_tokens=4")

    def run(annotator: ShardAnnotator, c: AnnotateConfig, out: str) -> tuple[dict, list[dict]]:
        (shard,) = plan_shards([(src, None)], c)
        shard["uri"] = storage.join(out, "data", shard["name"])
        summary = json.loads(annotator({"shard": json.dumps(shard)})["summary"])
        return summary, read_dataset(out).to_pylist()

    _, plain = run(ShardAnnotator(plain_cfg), plain_cfg, str(tmp_path / "plain"))
    n = sum(r["task"] in REWRITTEN_TASKS for r in plain)
    assert n >= 3

    def same_sample(a: dict, b: dict) -> bool:
        return a["task"] == b["task"] and a["question"] == b["question"] and a["target"] == b["target"]

    # 1. the real tiny model: whatever it writes, an answer is the template or keeps its truth
    annotator = ShardAnnotator(cfg)
    summary, rows = run(annotator, cfg, str(tmp_path / "tiny"))
    assert sum(summary["rewrites"].values()) == n
    assert len(rows) == len(plain)
    for got, want in zip(rows, plain):
        assert same_sample(got, want)
        assert got["answer"] == want["answer"] or (got["task"] in REWRITTEN_TASKS
                                                  and keeps_truth(want["answer"], got["answer"]))

    # 2. a scripted model: every other rewrite adds a distortion and must be rejected
    calls = []

    def scripted(answer: str) -> str:
        calls.append(answer)
        return ("To put it plainly: " + answer) if len(calls) % 2 else (answer + " There is also severe noise.")

    annotator.rewriter.generate = scripted
    summary, rows = run(annotator, cfg, str(tmp_path / "scripted"))
    assert summary["rewrites"] == {"rewrites_accepted": (n + 1) // 2, "rewrites_rejected": n // 2}
    assert len(calls) == n
    accepted = 0
    for got, want in zip(rows, plain):
        assert same_sample(got, want)
        if got["task"] not in REWRITTEN_TASKS:
            assert got["answer"] == want["answer"]
        elif got["answer"] != want["answer"]:
            assert got["answer"] == "To put it plainly: " + want["answer"]
            accepted += 1
        assert "There is also severe noise." not in got["answer"]
    assert accepted == (n + 1) // 2


def test_import_mos_dmos_is_inverted(tmp_path):
    """A DMOS column (higher = worse): the best DMOS of the scale is excellent, the worst bad."""
    photos = small_photos(3)
    lines = ["Image_Name,DMOS"]
    for (name, img), dmos in zip(photos, (0.0, 50.0, 100.0)):
        storage.write_bytes(str(tmp_path / "img" / f"{name}.png"), encode_png(img))
        lines.append(f"{name}.png,{dmos}")
    (tmp_path / "dmos.csv").write_text("\n".join(lines) + "\n")
    summary = import_mos(str(tmp_path / "dmos.csv"), str(tmp_path / "img"), str(tmp_path / "out"),
                         scale_min=0, scale_max=100)
    assert summary["imported"] == 3 and summary["skipped"] == {}
    got = {Path(r["image_uri"]).stem: (r["target"]["quality_score"], r["target"]["quality_level"])
           for r in read_dataset(str(tmp_path / "out")).to_pylist()}
    (best, _), (mid, _), (worst, _) = photos
    assert got == {best: (5.0, "excellent"), mid: (3.0, "fair"), worst: (1.0, "bad")}


# ---------------------------------------------------------------- the documented quality rule

def test_quality_rule_worked_example_of_the_docs():
    """docs/annotation.md: blur 4 on a quarter of the image plus a jpeg 2 -> noise 3 chain
    (severity 4: one step per extra link) on 4 % of it -> score 2.91, fair."""
    from iqa_spider.annotate.distortions import Distortion
    from iqa_spider.annotate.truth import Region, Truth, level_for_score

    h = w = 100
    quarter = np.zeros((h, w), bool)
    quarter[:50, :50] = True
    small = np.zeros((h, w), bool)
    small[80:100, 80:100] = True
    blur = Region("r0", quarter, None, [Distortion("blur", "gaussian", 4)])
    chain = Region("r1", small, None, [Distortion("compression", "jpeg", 2), Distortion("noise", "gaussian", 3)])
    assert chain.severity == 4
    assert chain.damage() == pytest.approx(0.85 * 0.2) and blur.damage() == pytest.approx(0.85 * 0.5)
    truth = Truth([blur, chain, Region("r2", ~(quarter | small))], w, h)
    assert truth.quality_score() == pytest.approx(5 - 4 * (1 - (1 - 0.425) * (1 - 0.17)), abs=1e-4)
    assert truth.quality_score() == pytest.approx(2.909, abs=1e-3) and truth.quality_level() == "fair"
    # the chain alone is worse than either of its links alone on the same region
    alone = [Truth([Region("r", small, None, [d])], w, h).quality_score() for d in chain.distortions]
    assert Truth([chain], w, h).quality_score() < min(alone)
    # the bins, at their edges
    assert [level_for_score(s) for s in (5.0, 4.2, 4.19, 3.4, 2.6, 2.59, 1.8, 1.79, 1.0)] == \
        ["excellent", "excellent", "good", "good", "fair", "poor", "poor", "bad", "bad"]


# ---------------------------------------------------------------- grid regions
@pytest.mark.parametrize("grid, cells", [(2, {("top", "left"), ("top", "right"), ("bottom", "left"),
                                               ("bottom", "right")}),
                                         (3, {(v, h) for v in ("top", "middle", "bottom")
                                              for h in ("left", "center", "right")})])
def test_grid_regions_are_the_cells_their_position_words_name(grid, cells):
    """regions.method=grid: whatever the content (a crop view too), the regions tile the image
    and each one's position words name exactly its own cell."""
    from iqa_spider.annotate.pipeline import ShardAnnotator, region_templates

    cfg = config("in/", "out/", "regions.method=grid", f"regions.grid={grid}")
    annotator = ShardAnnotator(cfg)
    image = small_photos(1)[0][1][:100, :90]  # an odd size: cells of unequal sides
    proposals = annotator.proposals(image, seed=0, masks=None)
    masks = np.stack([p.mask for p in proposals])
    assert masks.shape == (grid * grid, 100, 90) and (masks.sum(0) == 1).all()
    regions = region_templates(proposals, image.shape, grid)["regions"]
    assert {r.position for r in regions} == cells
    for r in regions:
        ys, xs = np.nonzero(r.mask)
        # the cell is one rectangle, 1/grid of each side, and its words name where it is
        rows, cols = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert r.mask.sum() == rows * cols
        assert abs(rows - 100 / grid) < 1 and abs(cols - 90 / grid) < 1
        v_index = {"top": 0, "middle": 1, "bottom": grid - 1}[r.position[0]]
        h_index = {"left": 0, "center": 1, "right": grid - 1}[r.position[1]]
        assert int(ys.mean() / 100 * grid) == v_index and int(xs.mean() / 90 * grid) == h_index
