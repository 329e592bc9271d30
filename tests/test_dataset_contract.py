"""The dataset contract: exact RLE round trips, validation that catches bad rows, Parquet I/O."""
import copy

import numpy as np
import pyarrow as pa
import pytest

from iqa_spider.data import rle
from iqa_spider.data.io import read_dataset, write_shard
from iqa_spider.data.schema import DATASET_SCHEMA, DatasetError, image_id, sample_id, split_for, validate
from iqa_spider.vocab import position_words


@pytest.mark.parametrize("seed", range(20))
def test_rle_roundtrip_is_exact_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(1, 300, size=2)
    kind = seed % 4
    if kind == 0:
        mask = rng.random((h, w)) < rng.random()
    elif kind == 1:
        mask = np.zeros((h, w), bool)
        mask[rng.integers(0, h):, rng.integers(0, w):] = True
    elif kind == 2:
        mask = np.zeros((h, w), bool)
    else:
        mask = np.ones((h, w), bool)
    enc = rle.encode(mask)
    assert enc["size"] == [h, w] and isinstance(enc["counts"], str)
    dec = rle.decode(enc)
    assert dec.dtype == bool and np.array_equal(dec, mask)
    assert rle.area(enc) == int(mask.sum())


def test_bbox_and_position_words():
    mask = np.zeros((100, 200), bool)
    mask[10:30, 150:190] = True  # top right
    bbox = rle.bbox_normalized(mask)
    assert bbox == pytest.approx([0.75, 0.1, 0.95, 0.3])
    assert position_words(bbox) == ("top", "right")
    assert position_words([0.0, 0.6, 0.3, 1.0]) == ("bottom", "left")
    assert position_words([0.4, 0.4, 0.6, 0.6], grid=3) == ("middle", "center")
    assert rle.bbox_normalized(np.zeros((4, 4), bool)) is None


def good_row(i: int = 0) -> dict:
    mask = np.zeros((48, 64), bool)
    mask[:20, 40:] = True
    img = f"fake image bytes {i}".encode()
    iid = image_id(img)
    q, a = "Which is the most degraded region in the image?", "The most degraded region is the top right of the image."
    return {
        "sample_id": sample_id(iid, "grounding", q, a), "image_id": iid, "image": img, "image_uri": None,
        "width": 64, "height": 48, "task": "grounding", "subtask": "hyd", "question": q, "answer": a,
        "target": {
            "regions": [{"region_id": "r0", "mask_rle": rle.encode(mask), "bbox": rle.bbox_normalized(mask),
                         "position": ["top", "right"], "label": None,
                         "distortions": [{"type": "blur", "subtype": "gaussian", "severity": 4}]}],
            "target_region_ids": ["r0"], "whole_image": False, "quality_level": "poor", "quality_score": 2.0,
        },
        "source_uri": f"/photos/{i}.png", "split": split_for(f"/photos/{i}.png", 0.2), "schema_version": 1,
    }


def table(rows):
    return pa.Table.from_pylist(rows, schema=DATASET_SCHEMA)


def test_good_rows_validate():
    assert validate(table([good_row(0), good_row(1)])) == []


BAD_ROWS = {
    "no image at all": (lambda r: r.update(image=None), "image"),
    "both image and uri": (lambda r: r.update(image_uri="s3://b/k.png"), "image"),
    "unknown task": (lambda r: r.update(task="caption"), "task"),
    "grounding without subtask": (lambda r: r.update(subtask=None), "subtask"),
    "bad split": (lambda r: r.update(split="val"), "split"),
    "bbox outside 0..1": (lambda r: r["target"]["regions"][0].update(bbox=[0.5, 0.1, 1.5, 0.3]), "target.regions[0].bbox"),
    "severity 9": (lambda r: r["target"]["regions"][0]["distortions"][0].update(severity=9), "target.regions[0].distortions"),
    "unknown distortion": (lambda r: r["target"]["regions"][0]["distortions"][0].update(type="fog"),
                           "target.regions[0].distortions"),
    "dangling target id": (lambda r: r["target"].update(target_region_ids=["r7"]), "target.target_region_ids"),
    "mask of the wrong size": (lambda r: r["target"]["regions"][0].update(mask_rle=rle.encode(np.zeros((5, 5), bool))),
                               "target.regions[0].mask_rle"),
    "score out of range": (lambda r: r["target"].update(quality_score=7.0), "target.quality_score"),
    "unknown level": (lambda r: r["target"].update(quality_level="meh"), "target.quality_level"),
    "zero width": (lambda r: r.update(width=0), "width"),
    "empty answer": (lambda r: r.update(answer=""), "answer"),
    "wrong schema version": (lambda r: r.update(schema_version=2), "schema_version"),
    "position horizontal first": (lambda r: r["target"]["regions"][0].update(position=["right", "top"]),
                                  "target.regions[0].position"),
    "position with one word": (lambda r: r["target"]["regions"][0].update(position=["top"]),
                               "target.regions[0].position"),
    "unknown position word": (lambda r: r["target"]["regions"][0].update(position=["top", "east"]),
                              "target.regions[0].position"),
}


@pytest.mark.parametrize("name", sorted(BAD_ROWS))
def test_each_bad_row_is_reported_with_row_and_column(name):
    mutate, column = BAD_ROWS[name]
    rows = [good_row(0), copy.deepcopy(good_row(1)), good_row(2)]
    mutate(rows[1])
    violations = validate(table(rows))
    assert violations, name
    assert any(v.row == 1 and v.column == column for v in violations), violations
    assert all(v.row == 1 for v in violations)


def test_position_must_be_vertical_then_horizontal():
    """Evaluation reads position as (vertical, horizontal): [left, top] would score 0 silently,
    so the validator refuses it, naming the row and the fix."""
    from iqa_spider.data.schema import check

    rows = [good_row(0), good_row(1)]
    rows[1]["target"]["regions"][0]["position"] = ["left", "top"]
    with pytest.raises(DatasetError, match=r"row 1, column target.regions\[0\].position: .*horizontal first.*"
                                           r"\['top', 'left'\]"):
        check(table(rows))
    for ok in (["top", "left"], ["middle", "center"], ["bottom", "right"], [], None):
        rows[1]["target"]["regions"][0]["position"] = ok
        assert validate(table(rows)) == [], ok


def test_every_violation_is_reported_not_just_the_first():
    rows = [good_row(i) for i in range(4)]
    rows[0]["task"] = "nope"
    rows[2]["split"] = "dev"
    rows[3]["width"] = -1
    found = {(v.row, v.column) for v in validate(table(rows))}
    assert {(0, "task"), (2, "split"), (3, "width")} <= found


def test_duplicate_sample_ids_and_missing_columns():
    assert any(v.column == "sample_id" and v.row == 1 for v in validate(table([good_row(0), good_row(0)])))
    t = table([good_row(0)]).drop_columns(["split"])
    assert [(v.row, v.column) for v in validate(t)] == [(None, "split")]


def test_ids_and_split_are_stable():
    assert sample_id("a", "rating", "q", "x") == sample_id("a", "rating", "q", "x")
    assert sample_id("a", "rating", "q", "x") != sample_id("a", "rating", "q", "y")
    splits = [split_for(f"img{i}", 0.3) for i in range(2000)]
    assert splits == [split_for(f"img{i}", 0.3) for i in range(2000)]
    assert 0.25 < splits.count("test") / len(splits) < 0.35


def test_ids_and_split_are_pinned():
    """Golden values, computed once with the schema-v1 code. Existing datasets, resumed
    annotation runs (finished shards are found by name) and train/test separation across
    re-annotations all depend on these: if one changes, every dataset already written gets
    different ids, or images move between splits. Never update them to make a test pass."""
    iid = image_id(b"fake image bytes 0")
    assert iid == "6b9a78f324bcb2982dcd5fcd3b4aa60cad5ccba4dce41e87d5a2963e36aed241"
    assert sample_id(iid, "rating", "How would you rate the quality of this image?",
                     "The quality of the image is poor.") == "3f3acd94c637041af0127838afd3a65e"
    assert sample_id("a", "rating", "q", "x") == "81ce53a5e65b546261d1dec6a11c2963"
    assert [split_for(f"img{i}", 0.5) for i in range(8)] == \
        ["train", "train", "test", "train", "train", "test", "test", "test"]
    # the same keys at another fraction: a key's bucket is fixed, only the threshold moves
    assert [split_for(f"img{i}", 0.3) for i in range(8)] == \
        ["train", "train", "train", "train", "train", "test", "test", "train"]
    assert split_for(iid, 0.5) == "train"


def test_copies_of_one_photo_under_other_names_share_a_split(tmp_path):
    """The split follows the pristine photo's content (split_for(image_id(bytes))), not its
    name or place: a copy under another name never lands in the other split."""
    import itertools
    from collections import Counter

    from conftest import REPO
    from iqa_spider.annotate.pipeline import ShardAnnotator, iter_builtin_photos
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig
    from iqa_spider.images import encode_png

    inp = tmp_path / "in"
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={inp}", f"output.uri={tmp_path / 'out'}", "distort.max_side=64",
                       "distort.variants_per_image=1", "test_fraction=0.5"])
    annotator = ShardAnnotator(cfg)
    seen = set()
    for name, img in itertools.islice(iter_builtin_photos(), 4):
        data = encode_png(img)
        original = str(inp / f"{name}.png")
        # the copy's name is picked so that a split by name would separate it from the
        # original, whatever tmp_path is: the test can then tell the two rules apart
        copy = next(c for c in (str(inp / "copies" / f"copy {k} of {name}.png") for k in range(64))
                    if split_for(c, 0.5) != split_for(original, 0.5))
        uris = (original, copy)
        splits = []
        for uri in uris:
            rows = annotator.annotate_source(uri, data, None, Counter())
            assert rows and {r["source_uri"] for r in rows} == {uri}
            (split,) = {r["split"] for r in rows}
            splits.append(split)
        assert splits[0] == splits[1] == split_for(image_id(data), 0.5), name
        seen.add(splits[0])
    assert seen == {"train", "test"}


def test_parquet_shards_roundtrip_local_and_s3(tmp_path, moto_s3):
    for base in (str(tmp_path / "ds"), moto_s3.uri("ds")):
        write_shard([good_row(0), good_row(1)], base + "/part-00000.parquet")
        write_shard([good_row(2)], base + "/part-00001.parquet")
        t = read_dataset(base)
        assert t.num_rows == 3 and t.schema.equals(DATASET_SCHEMA)
        back = rle.decode(t.column("target")[0].as_py()["regions"][0]["mask_rle"])
        assert back.sum() == 20 * 24


def test_write_shard_refuses_bad_rows(tmp_path):
    bad = good_row(0)
    bad["split"] = "nope"
    with pytest.raises(DatasetError, match="row 0, column split"):
        write_shard([bad], str(tmp_path / "x.parquet"))
    assert not (tmp_path / "x.parquet").exists()
