"""The annotation job end to end on a real local Ray: local folder and moto S3."""
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from iqa_spider import storage
from iqa_spider.annotate.pipeline import iter_builtin_photos, run_annotate
from iqa_spider.config import load_config
from iqa_spider.config.schemas import AnnotateConfig
from iqa_spider.data import rle
from iqa_spider.data.io import read_dataset
from iqa_spider.images import decode_image, encode_png, resize_max_side

MAX_SIDE = 128
N_PHOTOS = 4


def write_inputs(base: str) -> None:
    """A few real photos (one in a subfolder, one with a space and unicode) and three bad files."""
    photos = list(itertools.islice(iter_builtin_photos(), N_PHOTOS))
    for i, (name, img) in enumerate(photos):
        sub = "nested/" if i == 0 else ""
        fname = f"{name} é.png" if i == 1 else f"{name}.png"
        storage.write_bytes(storage.join(base, sub + fname), encode_png(img))
    good = encode_png(photos[0][1])
    storage.write_bytes(storage.join(base, "truncated.png"), good[: len(good) // 3])
    storage.write_bytes(storage.join(base, "empty.jpg"), b"")
    storage.write_bytes(storage.join(base, "notes.jpg"), b"this is a text file, not a JPEG")
    # not an image file name: passed over and counted as ignored, neither a source nor a failure
    storage.write_bytes(storage.join(base, "nested", "README.txt"), b"photos from the 2024 trip")


def config(inp: str, out: str, *extra: str) -> AnnotateConfig:
    return load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                       [f"input.uri={inp}", f"output.uri={out}", f"distort.max_side={MAX_SIDE}",
                        "output.shard_size=3", "distort.whole_image_prob=0.1", "distort.clean_prob=0.0", *extra])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("annotate")
    write_inputs(str(root / "in"))
    cfg = config(str(root / "in"), str(root / "out"))
    summary = run_annotate(cfg)
    return cfg, summary, read_dataset(str(root / "out"))


def test_summary_counts_every_input(local_run):
    cfg, summary, table = local_run
    assert summary["sources"] == N_PHOTOS + 3
    assert summary["annotated"] == N_PHOTOS
    assert summary["skipped"] == {"corrupt": 1, "empty": 1, "not_an_image": 1}
    assert summary["ignored_files"] == 1
    assert summary["samples"] == table.num_rows > 0
    on_disk = json.loads(storage.read_bytes(storage.join(cfg.output.uri, "_summary.json")))
    assert on_disk["annotated"] == N_PHOTOS


def test_every_task_and_split_is_written(local_run):
    _, _, table = local_run
    tasks = set(table.column("task").to_pylist())
    assert tasks == {"global_desc", "local_desc", "grounding", "referring_short", "referring_long", "rating"}
    # one split per source image
    by_source = {}
    for src, split in zip(table.column("source_uri").to_pylist(), table.column("split").to_pylist()):
        by_source.setdefault(src, set()).add(split)
    assert all(len(s) == 1 for s in by_source.values())


def pristine_for(source_uri: str) -> np.ndarray:
    return np.asarray(resize_max_side(decode_image(storage.read_bytes(source_uri)), MAX_SIDE)).astype(np.int16)


def test_grounding_masks_are_where_the_distortion_is(local_run):
    _, _, table = local_run
    checked = 0
    for row in (r for r in table.to_pylist() if r["task"] == "grounding"):
        target = row["target"]
        if target["whole_image"]:
            continue
        regions = {r["region_id"]: r for r in target["regions"]}
        region = regions[target["target_region_ids"][0]]
        m = rle.decode(region["mask_rle"])
        distorted = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["image_uri"])))).astype(np.int16)
        diff = np.abs(distorted - pristine_for(row["source_uri"])).mean(axis=-1)
        # compare with the parts of the image no distortion touched (beyond the feathered edges)
        untouched = np.ones_like(m)
        for r in regions.values():
            if r["distortions"]:
                untouched &= ~rle.decode(r["mask_rle"])
        inside = diff[m].mean()
        outside = diff[untouched].mean() if untouched.any() else 0.0
        assert inside > outside + 0.5, (row["question"], inside, outside)
        # position words: the 2x2 cell holding the most of the region's area, and the answer says them
        h, w = m.shape
        quarter = {("top", "left"): m[:h // 2, :w // 2].sum(), ("top", "right"): m[:h // 2, w // 2:].sum(),
                   ("bottom", "left"): m[h // 2:, :w // 2].sum(), ("bottom", "right"): m[h // 2:, w // 2:].sum()}
        assert quarter[tuple(region["position"])] == max(quarter.values()), (region["position"], quarter)
        assert " ".join(region["position"]) in row["answer"]
        checked += 1
    assert checked >= 3


def test_rerun_is_idempotent(local_run):
    cfg, first, table = local_run
    again = run_annotate(cfg)
    assert again["shards"] == {"written": 0, "reused": first["shards"]["written"] + first["shards"]["reused"]}
    assert again["skipped"] == first["skipped"] and again["samples"] == first["samples"]
    assert sorted(read_dataset(cfg.output.uri).column("sample_id").to_pylist()) == \
        sorted(table.column("sample_id").to_pylist())


def test_skipped_sources_are_named_and_retried_on_request(ray_local, tmp_path):
    """An unreadable source (a link to a photo not there yet) is skipped and named; once it can be
    read, a re-run with input.retry_skipped=[unreadable] annotates its shard again, whole, under
    the same name, and nothing else."""
    photos = list(itertools.islice(iter_builtin_photos(), 4))
    inp, out, later = tmp_path / "in", tmp_path / "out", tmp_path / "later.png"
    for name, img in photos[:3]:
        storage.write_bytes(str(inp / f"{name}.png"), encode_png(img))
    os.symlink(later, inp / "zz_late.png")  # listed, not readable: FileNotFoundError
    first = run_annotate(config(str(inp), str(out)))
    late = str(inp / "zz_late.png")
    assert first["skipped"] == {"unreadable": 1} and first["annotated"] == 3
    assert first["skipped_sources"] == [{"uri": late, "reason": "unreadable"}]
    shards = sorted(p.name for p in (out / "data").glob("*.parquet"))
    assert run_annotate(config(str(inp), str(out)))["shards"]["written"] == 0  # skips are final by default
    later.write_bytes(encode_png(photos[3][1]))
    again = run_annotate(config(str(inp), str(out), "input.retry_skipped=[unreadable]"))
    assert again["shards"] == {"written": 1, "reused": len(shards) - 1}
    assert again["skipped"] == {} and again["annotated"] == 4 and again["skipped_sources"] == []
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == shards  # rewritten in place
    table = read_dataset(str(out))
    assert late in set(table.column("source_uri").to_pylist())
    assert len(set(table.column("sample_id").to_pylist())) == table.num_rows  # no sample twice


def test_same_seed_gives_same_sample_ids_in_a_fresh_output(local_run, tmp_path):
    cfg, _, table = local_run
    fresh = config(cfg.input.uri, str(tmp_path / "out2"))
    run_annotate(fresh)
    assert sorted(read_dataset(fresh.output.uri).column("sample_id").to_pylist()) == \
        sorted(table.column("sample_id").to_pylist())


def test_job_script_on_moto_s3(moto_s3, tmp_path):
    inp, out = moto_s3.uri("photos"), moto_s3.uri("dq")
    write_inputs(inp)
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs/annotate.py"), "--config", str(REPO / "configs/annotate.yaml"),
         f"input.uri={inp}", f"output.uri={out}", f"distort.max_side={MAX_SIDE}", "distort.variants_per_image=1",
         "ray.num_cpus=1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(storage.read_bytes(f"{out}/_summary.json"))
    assert summary["annotated"] == N_PHOTOS and sum(summary["skipped"].values()) == 3
    assert summary["sources"] == N_PHOTOS + 3 and summary["ignored_files"] == 1
    table = read_dataset(out)
    assert table.num_rows == summary["samples"]
    assert all(u.startswith(f"s3://{moto_s3.bucket}/dq/images/") for u in table.column("image_uri").to_pylist())
    assert "shard" in proc.stderr  # progress is logged as shards finish


def test_bad_config_fails_fast():
    proc = subprocess.run([sys.executable, str(REPO / "jobs/annotate.py"), "--config",
                           str(REPO / "configs/annotate.yaml"), "input.uri=x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "output.uri" in proc.stderr


def test_output_inside_the_input_is_not_a_source(tmp_path):
    """Listing only: image files are sources, other files and the job's own output are ignored."""
    from iqa_spider.annotate.pipeline import list_sources

    name, img = next(iter_builtin_photos())
    png = encode_png(img[:32, :32])
    for rel in (f"{name}.png", "sub/B.JPG", "labels.csv", "out/images/x.png", "out/data/shard.parquet"):
        storage.write_bytes(str(tmp_path / rel), png)
    sources, ignored = list_sources(config(str(tmp_path), str(tmp_path / "out")))
    assert sorted(s for s, _ in sources) == sorted([str(tmp_path / f"{name}.png"), str(tmp_path / "sub/B.JPG")])
    assert all(m is None for _, m in sources) and ignored == 3
    # an output folder beside the input (a shared name prefix) is not mistaken for it
    sources, _ = list_sources(config(str(tmp_path / "sub"), str(tmp_path / "su")))
    assert [s for s, _ in sources] == [str(tmp_path / "sub/B.JPG")]


# ---------------------------------------------------------------- pristine views (no Ray)

def view_config(tmp_path, *extra: str) -> AnnotateConfig:
    return load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                       [f"input.uri={tmp_path / 'in'}", f"output.uri={tmp_path / 'out'}", "distort.max_side=64",
                        "output.embed_images=true", *extra])


def annotate_one(cfg: AnnotateConfig, name: str, img: np.ndarray, masks=None) -> list[dict]:
    from collections import Counter

    from iqa_spider.annotate.pipeline import ShardAnnotator

    return ShardAnnotator(cfg).annotate_source(storage.join(cfg.input.uri, f"{name}.png"), encode_png(img),
                                               masks, Counter())


def test_view_zero_is_the_one_view_output_and_the_others_differ(tmp_path):
    from iqa_spider.annotate.pipeline import ShardAnnotator, stable_int

    name, img = next(iter_builtin_photos())
    one = annotate_one(view_config(tmp_path, "distort.views_per_image=1"), name, img)
    default = annotate_one(view_config(tmp_path), name, img)
    cfg = view_config(tmp_path, "distort.views_per_image=4")
    four = annotate_one(cfg, name, img)
    assert one == default  # views_per_image=1 is the default and the job as it was
    assert four[:len(one)] == one  # view 0: the same rows, in the same order
    # the other views: other pristine content, so other images, each at most max_side
    views = list(ShardAnnotator(cfg).views(decode_image(encode_png(img)),
                                           stable_int(cfg.seed, f"{name}.png"), None))
    assert len(views) == 4
    assert np.array_equal(views[0][0], np.asarray(resize_max_side(decode_image(encode_png(img)), 64)))
    for i, (a, _, props) in enumerate(views):
        assert a.dtype == np.uint8 and a.ndim == 3 and max(a.shape[:2]) <= 64
        assert props and all(p.mask.shape == a.shape[:2] for p in props)
        for b, _, _ in views[:i]:
            assert a.shape != b.shape or not np.array_equal(a, b)
    assert len({s for _, s, _ in views}) == 4  # a seed per view
    others = {r["image_id"] for r in four[len(one):]}
    assert others and not (others & {r["image_id"] for r in one})


def test_views_are_deterministic_and_share_the_source_split(tmp_path):
    from iqa_spider.data.schema import image_id, split_for

    cfg = view_config(tmp_path, "distort.views_per_image=3", "distort.variants_per_image=1", "test_fraction=0.5")
    again = view_config(tmp_path, "distort.views_per_image=3", "distort.variants_per_image=1", "test_fraction=0.5")
    seen = set()
    for name, img in itertools.islice(iter_builtin_photos(), 4):
        rows = annotate_one(cfg, name, img)
        assert rows == annotate_one(again, name, img)  # a fresh annotator, the same rows
        assert len({r["image_id"] for r in rows}) >= 3
        assert {r["split"] for r in rows} == {split_for(image_id(encode_png(img)), 0.5)}
        seen |= {r["split"] for r in rows}
    assert seen == {"train", "test"}


def test_one_view_keeps_the_shard_names():
    """views_per_image=1 is the job as it was before views: the same content hash, so the same
    shard names (finished shards are reused) whatever view_min_side says. The pinned value is
    the hash of configs/annotate.yaml; it changes only when a content setting is added or
    changed, which is what renames shards."""
    from iqa_spider.annotate.pipeline import content_fingerprint

    def fp(*extra: str) -> str:
        return content_fingerprint(load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                                               ["input.uri=a", "output.uri=b", *extra]))

    assert fp() == fp("distort.views_per_image=1", "distort.view_min_side=0.9") == "274225fef8145efe"
    assert len({fp(), fp("distort.views_per_image=2"), fp("distort.views_per_image=3"),
                fp("distort.views_per_image=2", "distort.view_min_side=0.9")}) == 4
    # min_severity likewise: 1 (the full range) keeps the names, anything else is new content
    assert fp("distort.min_severity=1") == fp()
    assert len({fp(), fp("distort.min_severity=4"), fp("distort.min_severity=5")}) == 3


def test_min_severity_annotates_only_strong_damage(tmp_path):
    """distort.min_severity=4 (a curriculum's first dataset): every distortion written is
    severity 4 or 5; the full range would have drawn milder ones from the same photo."""
    name, img = next(iter_builtin_photos())

    def severities(*extra: str) -> set[int]:
        rows = annotate_one(view_config(tmp_path, "distort.variants_per_image=8", "distort.clean_prob=0", *extra),
                            name, img)
        return {d["severity"] for r in rows for reg in r["target"]["regions"] for d in reg["distortions"]}

    assert severities("distort.min_severity=4") <= {4, 5} and severities("distort.min_severity=4")
    assert severities() & {1, 2, 3}


def test_families_annotates_only_those_families_and_refuses_a_set_it_cannot_draw(tmp_path):
    """distort.families (the demo's few families): every distortion written is one of them, in
    whole-image and regional variants and DAO chains alike; a set the sampler cannot draw from
    is a config error before any work, and null (all families) keeps the shard names."""
    from iqa_spider.annotate.pipeline import check_families, content_fingerprint
    from iqa_spider.config import ConfigError

    name, img = next(iter_builtin_photos())
    overrides = ("distort.variants_per_image=12", "distort.clean_prob=0", "distort.whole_image_prob=0.5",
                 "distort.dao_prob=0.5", "distort.families=[blur,noise,compression,brighten]")
    cfg = view_config(tmp_path, *overrides)
    rows = annotate_one(cfg, name, img)
    chains = [reg["distortions"] for r in rows for reg in r["target"]["regions"] if reg["distortions"]]
    assert any(len(c) == 2 for c in chains)                                    # DAO chains among them
    written = {d["type"] for c in chains for d in c}
    assert written and written <= {"blur", "noise", "compression", "brighten"}
    with pytest.raises(ConfigError, match="dao_prob"):   # no accumulation order within [blur]
        check_families(view_config(tmp_path, "distort.families=[blur]", "distort.dao_prob=0.3").distort)
    check_families(view_config(tmp_path, "distort.families=[blur]", "distort.dao_prob=0").distort)
    with pytest.raises(ConfigError, match="dao_prob"):   # its only order starts with a saturation change
        check_families(view_config(tmp_path, "distort.families=[saturate_weaken,noise]").distort)
    with pytest.raises(ConfigError, match="saturation"):
        check_families(view_config(tmp_path, "distort.families=[saturate_weaken]", "distort.dao_prob=0").distort)
    assert (content_fingerprint(view_config(tmp_path, "distort.families=null"))
            == content_fingerprint(view_config(tmp_path)))
    assert content_fingerprint(cfg) != content_fingerprint(view_config(tmp_path, *overrides[:-1]))  # new data, new shards


def test_view_boxes_lie_in_the_photo():
    from iqa_spider.annotate.pipeline import view_box

    rng = np.random.default_rng(0)
    flips = 0
    for w, h in ((640, 427), (102, 102), (172, 448), (3, 2)):
        for _ in range(200):
            (x0, y0, x1, y1), flip = view_box(rng, w, h, 0.4)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert max(x1 - x0, y1 - y0) >= 0.4 * 0.9 * min(w, h) - 1
            flips += flip
    assert 300 < flips < 500  # mirrored about half the time


def test_user_masks_are_cropped_with_their_view(tmp_path):
    name, img = next(iter_builtin_photos())
    h, w = img.shape[:2]
    top = np.zeros((h, w), bool)
    top[: h // 2] = True
    masks = [{"mask_rle": rle.encode(top), "label": "sky"}, {"mask_rle": rle.encode(~top), "label": "ground"}]
    cfg = view_config(tmp_path, "regions.method=masks", "distort.views_per_image=4", "distort.variants_per_image=1",
                      "distort.whole_image_prob=0.0")
    rows = annotate_one(cfg, name, img, masks)
    assert len({r["image_id"] for r in rows}) >= 3
    for row in rows:
        regions = row["target"]["regions"]
        assert regions and {r["label"] for r in regions} <= {"sky", "ground"}
        got = [rle.decode(r["mask_rle"]) for r in regions]
        assert all(m.shape == (row["height"], row["width"]) for m in got)
        # a horizontal split stays horizontal under crops and mirroring: sky is above ground
        by = {r["label"]: m for r, m in zip(regions, got)}
        if len(by) == 2:
            assert np.nonzero(by["sky"])[0].max() < np.nonzero(by["ground"])[0].min() + 2


def test_builtin_photos_are_rgb_and_distinct():
    photos = list(iter_builtin_photos())
    names = [n for n, _ in photos]
    assert len(names) == len(set(names)) >= 20
    assert names[:4] == ["astronaut", "chelsea", "coffee", "rocket"]  # callers take the first few
    digests = set()
    for name, img in photos:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 64, name
        digests.add(hash(img.tobytes()))
    assert len(digests) == len(photos)  # no photo twice under two names (skimage's cat is chelsea)
