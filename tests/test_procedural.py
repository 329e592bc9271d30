"""Generated pristine sources (annotate/procedural.py): reproducible, clean yet full of edges
and flat regions, written resumably, and annotated into the train split only when the quality
run asks (bench/quality.py --generated)."""
import os
import subprocess
import sys
from collections import Counter

import numpy as np
from PIL import Image

from conftest import BIN, REPO
from iqa_spider.annotate.procedural import dead_leaves, write_procedural_images

sys.path.insert(0, str(REPO / "bench"))
import quality


def test_dead_leaves_is_reproducible_and_each_seed_a_new_content():
    a = dead_leaves(np.random.default_rng([0, 1]), 96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, dead_leaves(np.random.default_rng([0, 1]), 96))
    b = dead_leaves(np.random.default_rng([0, 2]), 96)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_dead_leaves_has_sharp_edges_and_flat_regions_as_a_pristine_photo_does():
    """What the distortions need to show on: many strong edges (blur, compression), and wide
    areas with almost no local variation (noise), so the image is neither noise nor blank."""
    img = dead_leaves(np.random.default_rng([0, 3]), 224).astype(np.float32).mean(axis=2)
    gx, gy = np.abs(np.diff(img, axis=1))[:-1], np.abs(np.diff(img, axis=0))[:, :-1]
    grad = np.maximum(gx, gy)
    assert (grad > 30).mean() > 0.01  # edges
    assert (grad < 2).mean() > 0.3    # flat or smoothly shaded
    assert img.std() > 15


def test_write_procedural_images_resumes_and_grows(tmp_path):
    uris = write_procedural_images(str(tmp_path), 3, seed=5, side=64)
    assert len(uris) == 3 and all(os.path.exists(u) for u in uris)
    with Image.open(uris[0]) as im:
        assert im.size == (64, 64)
    first = os.stat(uris[0]).st_mtime_ns
    more = write_procedural_images(str(tmp_path), 4, seed=5, side=64)
    assert more[:3] == uris and os.stat(uris[0]).st_mtime_ns == first  # kept, not drawn again


def test_generated_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([str(BIN / "iqa-spider"), "data", "generated", "--out", str(tmp_path), "--count", "2",
                         "--side", "48"], capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "wrote 2 generated" in ok.stdout and len(list(tmp_path.glob("*.png"))) == 2
    bad = subprocess.run([str(BIN / "iqa-spider"), "data", "generated", "--out", str(tmp_path), "--count", "0"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "--count" in bad.stderr


def test_generated_sources_annotate_into_the_train_split_only(tmp_path):
    """The quality run's settings for generated sources: one whole view each, every row in the
    train split (the held-out split stays the photos'), and rows valid under the contract."""
    import pyarrow as pa

    from iqa_spider.annotate.pipeline import ShardAnnotator
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig
    from iqa_spider.data.schema import DATASET_SCHEMA, check
    from iqa_spider.images import encode_png

    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={tmp_path}", f"output.uri={tmp_path / 'out'}", *quality.QUALITY_ANNOTATE,
                       *quality.GENERATED_ANNOTATE, "distort.max_side=64", "output.embed_images=true"])
    annotator = ShardAnnotator(cfg)
    rows = []
    for i in range(3):
        data = encode_png(dead_leaves(np.random.default_rng([0, i]), 64))
        rows += annotator.annotate_source(str(tmp_path / f"leaves_{i}.png"), data, None, Counter())
    assert {r["split"] for r in rows} == {"train"}
    assert len({r["image_id"] for r in rows}) == 3 * cfg.distort.variants_per_image  # one view, its variants
    check(pa.Table.from_pylist(rows, schema=DATASET_SCHEMA))
