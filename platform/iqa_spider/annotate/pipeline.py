"""The annotation job: pristine images -> distorted images + four-task Parquet shards.

Straight path, per source image: decode -> shrink -> propose regions -> for each variant:
pick distortions, apply them inside their regions, derive the truth, write every task's
samples from it. Sources are grouped into shards; each shard is one Ray Data task that
writes one Parquet file under a name derived from its sources and the config, so a re-run
finds finished shards and skips them, and a retried task overwrites rather than duplicates.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from iqa_spider import storage
from iqa_spider.annotate import distortions as D
from iqa_spider.annotate import regions as region_proposals
from iqa_spider.annotate.truth import Region, Truth
from iqa_spider.annotate.writers import Sample, sample_rows, write_all
from iqa_spider.config import ConfigError
from iqa_spider.config.schemas import AnnotateConfig
from iqa_spider.data.io import read_shard_summary, write_table
from iqa_spider.data.schema import DATASET_SCHEMA, SCHEMA_VERSION, check, image_id, split_for
from iqa_spider.entrypoint import run_job
from iqa_spider.images import IMAGE_SUFFIXES, ImageError, decode_image, encode_png, resize_max_side
from iqa_spider.raycluster import ensure_ray

log = logging.getLogger(__name__)
REWRITTEN_TASKS = ("global_desc", "local_desc", "referring_long")
MAX_SKIPPED_LISTED = 1000  # skipped sources named in the run's _summary.json (every shard names its own)


def stable_int(*parts: object) -> int:
    """A 63-bit seed from any parts, identical on every machine and Python run."""
    return int(hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def content_fingerprint(cfg: AnnotateConfig) -> str:
    """Hash of every setting that changes what is written (not where it is written)."""
    relevant = {k: asdict(cfg)[k] for k in ("regions", "distort", "tasks", "rewrite", "test_fraction", "seed")}
    if relevant["distort"].get("views_per_image", 1) == 1:
        # One view is the whole photo, as before views existed (view_min_side is then unused):
        # the hash, and so every shard name, stays what it was, and old shards are reused.
        relevant["distort"].pop("views_per_image", None)
        relevant["distort"].pop("view_min_side", None)
    if relevant["distort"].get("min_severity", 1) == 1:  # the full range, as before the option
        relevant["distort"].pop("min_severity", None)
    if relevant["distort"].get("families") is None:  # every family, as before the option
        relevant["distort"].pop("families", None)
    relevant["schema_version"] = SCHEMA_VERSION
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one image

COLOUR_FAMILIES = ("saturate_strengthen", "saturate_weaken")


def is_grey(pixels: np.ndarray) -> bool:
    """Near-grey pixels: a saturation change would leave them untouched, so the label would lie."""
    chroma = pixels.max(axis=-1).astype(np.int16) - pixels.min(axis=-1)
    return float(chroma.mean()) < 8.0


def sample_chain(rng: np.random.Generator, dao: bool, grey: bool, min_severity: int = 1,
                 families: tuple[str, ...] = D.DISTORTION_FAMILIES) -> list[D.Distortion]:
    """One distortion, or a DAO two-step chain; no saturation change on grey content."""
    for _ in range(50):
        chain = (D.sample_dao_chain(rng, min_severity, families) if dao
                 else [D.sample_distortion(rng, min_severity=min_severity, families=families)])
        if not (grey and any(d.type in COLOUR_FAMILIES for d in chain)):
            return chain
    raise AssertionError("unreachable: distort.families holds a family that is not a colour change")


def check_families(dc) -> None:
    """``distort.families`` against what the sampler needs (the schema has checked the names)."""
    families = dc.family_set
    if all(f in COLOUR_FAMILIES for f in families):
        raise ConfigError("needs a family that is not a saturation change: grey content takes none",
                          key="distort.families")
    # grey content takes no saturation change, so a DAO chain there needs an order without one
    if dc.dao_prob > 0 and not D.accumulation_orders(tuple(f for f in families if f not in COLOUR_FAMILIES)):
        raise ConfigError(f"no two-step accumulation order without a saturation change lies within "
                          f"{list(families)}: set distort.dao_prob=0 or add families", key="distort.families")


def region_templates(proposals: list[region_proposals.Proposal], image_shape: tuple[int, ...], grid: int) -> dict:
    """One view's regions, made once and copied for each of its variants: ``regions`` (the
    proposals as r0, r1, ...) and ``whole`` (the whole image), with what their masks give
    (area, bbox, position, RLE) computed here once instead of for every sample."""
    h, w = image_shape[:2]
    regions = [Region(f"r{k}", p.mask, p.label, grid=grid) for k, p in enumerate(proposals)]
    whole = Region("whole", np.ones((h, w), bool), None, grid=grid)
    for r in (*regions, whole):  # fill the caches the copies share
        for cached in ("area_fraction", "bbox", "position", "is_whole_image", "mask_rle"):
            getattr(r, cached)
    return {"regions": regions, "whole": whole}


def _fresh(template: Region, distortions: list[D.Distortion] | None = None) -> Region:
    region = copy.copy(template)  # keeps the cached area, bbox, position and RLE
    region.distortions = list(distortions or [])
    return region


def make_variant(rng: np.random.Generator, image: np.ndarray, proposals: list[region_proposals.Proposal] | dict,
                 cfg: AnnotateConfig) -> tuple[np.ndarray, Truth]:
    """Choose what to distort and where, apply it, and return the distorted image and its truth.
    `proposals`: the view's region proposals, or their `region_templates` (the same, faster)."""
    h, w = image.shape[:2]
    dc = cfg.distort
    templates = (proposals if isinstance(proposals, dict)
                 else region_templates(proposals, image.shape, cfg.regions.grid))
    roll = rng.random()
    if roll < dc.clean_prob:
        return image, Truth([_fresh(t) for t in templates["regions"]], w, h)
    if roll < dc.clean_prob + dc.whole_image_prob:
        chain = sample_chain(rng, rng.random() < dc.dao_prob, is_grey(image), dc.min_severity, dc.family_set)
        whole = _fresh(templates["whole"], chain)
        return D.apply_in_region(image, whole.mask, chain, seed=int(rng.integers(2**31))), Truth([whole], w, h)

    regions = [_fresh(t) for t in templates["regions"]]
    n = int(rng.integers(1, min(dc.max_regions_distorted, len(regions)) + 1))
    chosen = rng.choice(len(regions), size=n, replace=False)
    dao_slot = int(rng.integers(n)) if rng.random() < dc.dao_prob else -1
    out = image
    for slot, k in enumerate(chosen):
        region = regions[int(k)]
        region.distortions = sample_chain(rng, slot == dao_slot, is_grey(image[region.mask]),
                                          dc.min_severity, dc.family_set)
        out = D.apply_in_region(out, region.mask, region.distortions, seed=int(rng.integers(2**31)),
                                feather_px=dc.feather_px)
    return out, Truth(regions, w, h)


def rows_for_variant(distorted_png: bytes, truth: Truth, samples: list[Sample], source_uri: str,
                     split: str, image_uri: str | None, cfg: AnnotateConfig) -> list[dict]:
    embed = cfg.output.embed_images
    return sample_rows(image_id(distorted_png), truth, samples, image=distorted_png if embed else None,
                       image_uri=None if embed else image_uri, source_uri=source_uri, split=split)


def view_box(rng: np.random.Generator, w: int, h: int, min_side: float) -> tuple[tuple[int, int, int, int], bool]:
    """A random crop (left, top, right, bottom) of a w x h photo, and whether to mirror it.

    Its side is a fraction U(min_side, 1) of the photo's: with the photo's aspect ratio, or
    (half the time) square on the photo's shorter side; either way one side is stretched and
    the other squeezed by up to about 10 % (the aspect by up to about 22 %), and the box is
    clipped to the photo. Placed uniformly; mirrored left-right half the time.
    """
    frac = rng.uniform(min_side, 1.0)
    jitter = math.sqrt(math.exp(rng.uniform(-0.2, 0.2)))
    if rng.random() < 0.5:
        cw, ch = frac * w * jitter, frac * h / jitter
    else:
        side = frac * min(w, h)
        cw, ch = side * jitter, side / jitter
    cw, ch = min(w, max(1, round(cw))), min(h, max(1, round(ch)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return (x0, y0, x0 + cw, y0 + ch), bool(rng.random() < 0.5)


def crop_proposals(proposals: list[region_proposals.Proposal], box: tuple[int, int, int, int], flip: bool,
                   shape: tuple[int, int], min_area_frac: float) -> list[region_proposals.Proposal]:
    """Full-photo masks cut to a view: cropped to `box`, mirrored with it, resized (nearest) to
    the view's `shape`; pieces under `min_area_frac` of the view are dropped, labels kept."""
    x0, y0, x1, y1 = box
    h, w = shape
    out = []
    for p in proposals:
        m = p.mask[y0:y1, x0:x1]
        if flip:
            m = m[:, ::-1]
        if m.shape != (h, w):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
        if m.any() and m.mean() >= min_area_frac:
            out.append(region_proposals.Proposal(np.ascontiguousarray(m), p.label))
    return out


class ShardAnnotator:
    """One Ray Data actor: loads optional models once, then annotates whole shards."""

    def __init__(self, cfg: AnnotateConfig):
        self.cfg = cfg
        rc = cfg.regions
        self.sam = (region_proposals.SamRegions(rc.sam_path, rc.max_regions, rc.min_area_frac, min_regions=rc.min_regions)
                    if rc.method == "sam" else None)
        self.rewriter = None
        if cfg.rewrite.enabled:
            from iqa_spider.annotate.rewrite import Rewriter

            self.rewriter = Rewriter(cfg.rewrite.model_path, cfg.rewrite.max_new_tokens)

    def proposals(self, image: np.ndarray, seed: int, masks: list[dict] | None) -> list[region_proposals.Proposal]:
        rc = self.cfg.regions
        if rc.method == "masks":
            props = region_proposals.user_regions(masks or [], *image.shape[:2])
            if not props:
                raise ImageError("no_regions", "method masks but the row has no usable mask")
            return props
        if rc.method == "grid":
            return region_proposals.grid_regions(*image.shape[:2], rc.grid)
        if self.sam is not None:
            props = self.sam(image)
            if len(props) >= rc.min_regions:
                return props
        return region_proposals.superpixel_regions(image, seed, rc.min_regions, rc.max_regions, rc.min_area_frac)

    def views(self, photo: Image.Image, base_seed: int,
              masks: list[dict] | None) -> Iterator[tuple[np.ndarray, int, list[region_proposals.Proposal]]]:
        """(pristine view, its seed, its region proposals) for each of `distort.views_per_image`
        views of one decoded photo.

        View 0 is the whole photo shrunk to `max_side`, seeded by the source's own seed (so one
        view writes exactly what the job wrote before views existed). View k > 0 is a random
        crop (`view_box`) of the full-resolution photo, maybe mirrored, shrunk to `max_side`,
        with a seed of its own for the crop, its regions and its variants. With user masks, a
        crop view gets the masks cropped with it; pieces below `regions.min_area_frac` of the
        view are dropped and a view left without any is passed over (the source is not).
        """
        dc = self.cfg.distort
        pristine = np.asarray(resize_max_side(photo, dc.max_side))
        yield pristine, base_seed, self.proposals(pristine, base_seed % (2**31), masks)
        full_masks: list[region_proposals.Proposal] | None = None
        for k in range(1, dc.views_per_image):
            seed = stable_int(base_seed, "view", k)
            box, flip = view_box(np.random.default_rng(seed), photo.width, photo.height, dc.view_min_side)
            crop = photo.crop(box)
            if flip:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = np.asarray(resize_max_side(crop, dc.max_side))
            if self.cfg.regions.method == "masks":
                if full_masks is None:
                    full_masks = region_proposals.user_regions(masks or [], photo.height, photo.width)
                props = crop_proposals(full_masks, box, flip, image.shape[:2], self.cfg.regions.min_area_frac)
                if not props:
                    log.debug("view %d (%s) keeps no user mask: passed over", k, box)
                    continue
            else:
                props = self.proposals(image, seed % (2**31), None)
            yield image, seed, props

    def annotate_source(self, source_uri: str, data: bytes, masks: list[dict] | None,
                        counts: Counter) -> list[dict]:
        cfg = self.cfg
        photo = decode_image(data, cfg.input.max_pixels)
        # The split follows the source's bytes: every view and variant of one photo shares it.
        split = split_for(image_id(data), cfg.test_fraction)
        # Seeded by the source's key below the input, not its absolute URI: the same collection
        # gets the same distortions (and sample_ids) wherever it is stored.
        base_seed = stable_int(cfg.seed, storage.relative_key(cfg.input.uri, source_uri))
        rows: list[dict] = []
        for pristine, view_seed, props in self.views(photo, base_seed, masks):
            templates = region_templates(props, pristine.shape, cfg.regions.grid)
            for v in range(cfg.distort.variants_per_image):
                rng = np.random.default_rng([view_seed, v])
                distorted, truth = make_variant(rng, pristine, templates, cfg)
                png = encode_png(distorted)
                image_uri = storage.join(cfg.output.uri, "images", f"{image_id(png)}.png")
                if not cfg.output.embed_images and not storage.exists(image_uri):
                    storage.write_bytes(image_uri, png)
                samples = write_all(rng, truth, cfg.tasks.local_per_image, cfg.tasks.referring_per_image)
                if self.rewriter is not None:
                    for s in samples:
                        if s.task in REWRITTEN_TASKS:
                            s.answer, ok = self.rewriter(s.answer)
                            counts["rewrites_accepted" if ok else "rewrites_rejected"] += 1
                rows.extend(rows_for_variant(png, truth, samples, source_uri, split, image_uri, cfg))
        return rows

    def __call__(self, item: dict) -> dict:
        shard = json.loads(item["shard"])  # JSON keeps Arrow from guessing types of nested masks
        started = time.monotonic()
        counts: Counter = Counter()
        skipped: Counter = Counter()
        skipped_sources: list[dict] = []  # which source, and why: what a re-run would retry
        rows: list[dict] = []
        transient = storage.transient_errors()
        for source, masks in zip(shard["sources"], shard["masks"] or [None] * len(shard["sources"])):
            try:
                data = storage.read_with_retry(source, self.cfg.input.read_retries)
                rows.extend(self.annotate_source(source, data, masks, counts))
                counts["annotated"] += 1
                continue
            except ImageError as exc:
                why = exc.reason
                log.warning("skipped %s: %s", source, exc)
            except transient as exc:  # missing, denied, S3 errors left after every retry
                why = "unreadable"
                log.warning("skipped %s: unreadable (%s: %s)", source, type(exc).__name__, exc)
            except Exception as exc:
                why = f"failed:{type(exc).__name__}"
                log.exception("skipped %s: annotation failed", source)
            skipped[why] += 1
            skipped_sources.append({"uri": source, "reason": why})
        # Two draws can write the same sample (two clean variants of one photo, or the same
        # region and template twice): identical (image, task, question, answer) is one sample.
        unique: dict[str, dict] = {}
        for row in rows:
            unique.setdefault(row["sample_id"], row)
        table = pa.Table.from_pylist(list(unique.values()), schema=DATASET_SCHEMA)
        check(table)
        summary = {"shard": shard["name"], "sources": len(shard["sources"]), "annotated": counts["annotated"],
                   "samples": table.num_rows, "duplicates_dropped": len(rows) - table.num_rows,
                   "skipped": dict(skipped), "skipped_sources": skipped_sources,
                   "samples_by_task": dict(Counter(table.column("task").to_pylist())),
                   "rewrites": {k: counts[k] for k in ("rewrites_accepted", "rewrites_rejected") if counts[k]},
                   "seconds": round(time.monotonic() - started, 3)}
        write_table(table, shard["uri"], summary=summary)
        return {"summary": json.dumps(summary)}


# ---------------------------------------------------------------- the job

def list_sources(cfg: AnnotateConfig) -> tuple[list[tuple[str, list | None]], int]:
    """(source_uri, masks) for every input image, and how many other files were passed over.

    The input is a folder/prefix (walked recursively) or a Parquet manifest (`image_uri`
    column, optional `masks` column). In a folder, files with an image suffix
    (images.IMAGE_SUFFIXES, any case) are sources; every one of them is either annotated or
    counted as skipped with its reason, so a broken or mis-named image is never lost
    silently. Other files (a README, a CSV of labels) are not images the user asked to
    annotate: they are counted as `ignored_files` in the summary, not as failures, and so
    are the files of an output folder that lies inside the input folder. Hidden files and
    unfinished atomic writes are not listed at all.
    """
    uri = cfg.input.uri
    storage.require_input(uri, "input.uri")
    if uri.endswith(".parquet"):
        from iqa_spider.data.io import read_table

        t = read_table(uri)
        if "image_uri" not in t.column_names:
            raise ConfigError(f"{uri}: a manifest needs an 'image_uri' column (it has {t.column_names})",
                              key="input.uri")
        masks = t.column("masks").to_pylist() if "masks" in t.column_names else [None] * t.num_rows
        return sorted(zip(t.column("image_uri").to_pylist(), masks), key=lambda x: x[0]), 0
    sources, ignored = [], 0
    for u in storage.iter_files(uri):
        if storage.is_below(u, cfg.output.uri):  # its distorted images are not new sources
            ignored += 1
            continue
        if u.lower().endswith(IMAGE_SUFFIXES):
            sources.append((u, None))
        else:
            ignored += 1
            log.info("not an image file name, ignored: %s", u)
    return sources, ignored


def plan_shards(sources: list[tuple[str, list | None]], cfg: AnnotateConfig) -> list[dict]:
    fp = content_fingerprint(cfg)
    shards = []
    size = max(1, cfg.output.shard_size)
    for i in range(0, len(sources), size):
        group = sources[i:i + size]
        key = hashlib.sha256((fp + "\n" + "\n".join(s for s, _ in group)).encode()).hexdigest()[:16]
        name = f"shard-{i // size:05d}-{key}.parquet"
        shards.append({"name": name, "uri": storage.join(cfg.output.uri, "data", name),
                       "sources": [s for s, _ in group],
                       "masks": [m for _, m in group] if any(m is not None for _, m in group) else None})
    return shards


def merge_summaries(summaries: Iterable[dict], reused: int, written: int, seconds: float) -> dict:
    summaries = list(summaries)
    total: dict = {"sources": 0, "annotated": 0, "samples": 0, "duplicates_dropped": 0, "skipped": Counter(),
                   "samples_by_task": Counter(), "rewrites": Counter()}
    for s in summaries:
        for k in ("sources", "annotated", "samples", "duplicates_dropped"):
            total[k] += s.get(k, 0)
        for k in ("skipped", "samples_by_task", "rewrites"):
            total[k].update(s.get(k, {}))
    total.update({k: dict(v) for k, v in total.items() if isinstance(v, Counter)})
    # which sources were skipped and why (the shards' footers hold them all; the run summary
    # stays readable for a million-image job)
    listed = [x for s in summaries for x in s.get("skipped_sources", [])]
    total["skipped_sources"] = listed[:MAX_SKIPPED_LISTED]
    total["skipped_sources_truncated"] = len(listed) > MAX_SKIPPED_LISTED
    total["shards"] = {"written": written, "reused": reused}
    total["seconds"] = round(seconds, 2)
    return total


def _to_retry(summary: dict, reasons: list[str]) -> bool:
    """Whether a finished shard skipped a source for one of `reasons` ("failed" covers every
    failed:<Error>)."""
    return any(why == r or why.startswith(f"{r}:") for why in summary.get("skipped", {}) for r in reasons)


def run_annotate(cfg: AnnotateConfig) -> dict:
    """Run the job; returns the run summary (also written to OUTPUT/_summary.json)."""
    import ray

    started = time.monotonic()
    check_families(cfg.distort)
    sources, ignored = list_sources(cfg)
    shards = plan_shards(sources, cfg)
    done, todo = [], []
    for shard in shards:
        summary = read_shard_summary(shard["uri"])
        if summary and not _to_retry(summary, cfg.input.retry_skipped):
            done.append(summary)
        else:  # new, or finished with skips a re-run is asked to retry: written again whole, same name
            todo.append(shard)
    log.info("annotate: %d sources in %d shards (%d other files ignored); %d already finished, %d to do",
             len(sources), len(shards), ignored, len(done), len(todo))
    written: list[dict] = []
    if todo:
        ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
        ds = ray.data.from_items([{"shard": json.dumps(s)} for s in todo], override_num_blocks=len(todo))
        # one actor per CPU at most (no more than there are shards), each loading its models once.
        # All of them from the start, and one shard in flight per actor: otherwise Ray Data
        # queues every shard on the first actor, which works through them one by one while
        # the other CPUs idle (a 2-CPU run took the time of a 1-CPU run).
        actors = max(1, min(len(todo), int(ray.available_resources().get("CPU", 1))))
        ds = ds.map(ShardAnnotator, fn_constructor_kwargs={"cfg": cfg}, num_cpus=1,
                    compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors,
                                                       max_tasks_in_flight_per_actor=1))
        for row in ds.iter_rows():
            s = json.loads(row["summary"])
            written.append(s)
            log.info("shard %d/%d done: %s (%d samples from %d/%d images, skipped %s)",
                     len(done) + len(written), len(shards), s["shard"], s["samples"], s["annotated"],
                     s["sources"], s["skipped"] or "none")
    total = merge_summaries(done + written, reused=len(done), written=len(written),
                            seconds=time.monotonic() - started)
    total["ignored_files"] = ignored
    storage.write_bytes(storage.join(cfg.output.uri, "_summary.json"), json.dumps(total, indent=2).encode())
    log.info("annotate summary: %s", json.dumps(total))
    return total


# The real-world photos that scikit-image ships in its wheel (no download), in a fixed order:
# callers take the first `limit`, so new names only ever go at the end. Left out: synthetic
# images (checkerboard, binary_blobs, shepp_logan_phantom, horse's silhouette, logo), `clock`
# (motion-blurred on purpose: not pristine), `cat` (the same pixels as `chelsea`),
# `lfw_subset` (25 px faces) and everything fetched over the network (brain, eagle, ...).
# `colorwheel` is synthetic but was in the collection from the start, so it stays.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "colorwheel", "retina", "camera", "page", "text", "moon",
                  "motorcycle_left", "motorcycle_right", "brick", "grass", "gravel", "coins", "cell",
                  "microaneurysms")
# scikit-learn's two sample photos (in its wheel), used when scikit-learn is installed.
SKLEARN_PHOTOS = ("china", "flower")


def _skimage_photos() -> Iterator[tuple[str, object]]:
    from skimage import data

    stereo = None
    for name in SKIMAGE_PHOTOS:
        try:
            if name.startswith("motorcycle_") and not hasattr(data, name):
                # one stereo pair in recent releases: stereo_motorcycle() -> (left, right, disparity)
                stereo = stereo or data.stereo_motorcycle()
                yield name, stereo[0] if name == "motorcycle_left" else stereo[1]
            else:
                yield name, getattr(data, name)()
        except Exception:  # noqa: BLE001 - not in this release, or it would need a download
            continue


def _sklearn_photos() -> Iterator[tuple[str, object]]:
    """scikit-learn's sample photos, read from its installed package folder (what
    load_sample_image reads) without importing scikit-learn, which takes seconds."""

    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:  # not a dependency: used only when it happens to be installed
        return
    folder = Path(spec.origin).parent / "datasets" / "images"
    for name in SKLEARN_PHOTOS:
        try:
            with Image.open(folder / f"{name}.jpg") as img:
                yield name, np.asarray(img.convert("RGB"))
        except OSError:  # a release without it: skip it
            continue


def iter_builtin_photos() -> Iterator[tuple[str, np.ndarray]]:
    """The bundled natural photos, (name, HxWx3 uint8 RGB), in a fixed order: scikit-image's
    (SKIMAGE_PHOTOS), then scikit-learn's two sample photos if scikit-learn is installed.
    Nothing is downloaded: a photo this installation does not ship is skipped, and so is one
    whose pixels repeat an earlier one's. Grey photos come as RGB."""
    seen: set[str] = set()
    for name, img in itertools.chain(_skimage_photos(), _sklearn_photos()):
        if isinstance(img, tuple):
            img = img[0]
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = np.ascontiguousarray(img[..., :3].astype(np.uint8))
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        yield name, img


def write_builtin_photos(out_uri: str, limit: int | None = None) -> list[str]:
    """Write the bundled photos (the first `limit` of them) as PNG files to `out_uri`; returns
    their URIs. Photos past the limit are never decoded."""
    uris = []
    for name, img in itertools.islice(iter_builtin_photos(), limit):
        uri = storage.join(out_uri, f"{name}.png")
        storage.write_bytes(uri, encode_png(img))
        uris.append(uri)
    return uris



def main(argv=None) -> int:
    return run_job(AnnotateConfig, run_annotate, argv, description="annotate: pristine images -> four-task dataset")
