"""`iqa-spider data ...`: bring images and sets into the dataset contract (docs/datasets-standard.md).

Each importer is imported where its command runs, so `iqa-spider --help` stays light.
"""
from __future__ import annotations

import argparse
import sys

from iqa_spider.entrypoint import setup_logging

# `data import NAME`: the published layouts, each (module:function, what it reads).
STANDARD_SETS = {
    "koniq10k": ("koniq:import_koniq", "KonIQ-10k: koniq10k_scores_and_distributions.csv + 1024x768/"),
    "spaq": ("spaq:import_spaq", "SPAQ: Annotations/MOS and Image attribute scores.xlsx + TestImage/"),
    "kadid10k": ("kadid:import_kadid", "KADID-10k: dmos.csv + images/"),
    "tid2013": ("tid2013:import_tid", "TID2013: mos_with_names.txt + distorted_images/"),
}
SPLIT_HELP = ("auto (default): the set's own split where it has one, else by source; source: a hash of "
              "the reference (or the image), so no content is on both sides; official; test: all of it "
              "in test, for a cross-set evaluation")


def _importer(spec: str):
    import importlib

    module, func = spec.split(":")
    return getattr(importlib.import_module(f"iqa_spider.annotate.importers.{module}"), func)


def _report(record: dict) -> int:
    split = record["split"]
    sides = " / ".join(f"{side} {split[side]['samples']}" for side in ("train", "test"))
    what = (f"{record['imported']} images as {record['samples']} samples" if "samples" in record
            else f"{record['imported']} rating samples")
    clamped = f"; {record['clamped']} MOS clamped to the scale" if record.get("clamped") else ""
    print(f"imported {what} to {record['output']}; skipped {record['skipped'] or 'none'}{clamped}; "
          f"split ({split['mode']}) {sides}; record {record['record']}")
    return 0


def _run(what: str, call) -> int:
    setup_logging()
    try:
        return _report(call())
    except (ValueError, OSError) as exc:  # a layout or table that is not the set's, a bad scale, no such file
        print(f"import {what}: {exc}", file=sys.stderr)
        return 2


def _import_standard(args: argparse.Namespace) -> int:
    run = _importer(STANDARD_SETS[args.dataset][0])
    return _run(args.dataset, lambda: run(args.root, args.output, table=args.table, images=args.images,
                                          split=args.split, test_fraction=args.test_fraction))


def _import_labelled(args: argparse.Namespace) -> int:
    run = _importer("labelled:import_labelled")
    return _run("labelled", lambda: run(args.table, args.images, args.output, args.test_fraction))


def _import_mos(args: argparse.Namespace) -> int:
    run = _importer("mos_table:import_mos")
    return _run("mos", lambda: run(args.table, args.images, args.output, args.scale_min, args.scale_max,
                                   args.test_fraction, args.split))


def _builtin_photos(args: argparse.Namespace) -> int:
    from iqa_spider.annotate.pipeline import write_builtin_photos

    uris = write_builtin_photos(args.out)
    print(f"wrote {len(uris)} bundled scikit-image photos to {args.out}")
    return 0


def _generated(args: argparse.Namespace) -> int:
    from iqa_spider.annotate.procedural import write_procedural_images  # numpy and PIL: not for --help

    setup_logging()
    if args.count < 1 or args.side < 32:
        print("generated: --count must be >= 1 and --side >= 32", file=sys.stderr)
        return 2
    uris = write_procedural_images(args.out, args.count, args.seed, args.side, progress=True)
    print(f"wrote {len(uris)} generated dead-leaves images ({args.side} px) to {args.out}")
    return 0


def _mos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="CSV, Parquet or .xlsx with image and mos (or dmos) columns")
    p.add_argument("--images", required=True, help="URI that relative image names are resolved against")
    p.add_argument("--output", required=True, help="output folder or .parquet URI")
    p.add_argument("--scale-min", type=float, default=1.0, help="lowest MOS of the table's scale")
    p.add_argument("--scale-max", type=float, default=5.0, help="highest MOS of the table's scale")
    p.add_argument("--split", default="auto", choices=("auto", "source", "test"), help=SPLIT_HELP)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.set_defaults(func=_import_mos)


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="action", required=True)
    imports = data.add_parser("import", help="bring a standard IQA set or a labelled table into the "
                              "dataset contract").add_subparsers(dest="dataset", required=True)
    for name, (_, layout) in STANDARD_SETS.items():
        p = imports.add_parser(name, help=layout)
        p.add_argument("--root", required=True, help="the set's folder as published (local or s3://)")
        p.add_argument("--output", required=True, help="output folder or .parquet URI")
        p.add_argument("--table", default=None, help="the score table, if not at its published place under --root")
        p.add_argument("--images", default=None, help="the images folder, if not at its published place")
        p.add_argument("--split", default="auto", choices=("auto", "source", "official", "test"), help=SPLIT_HELP)
        p.add_argument("--test-fraction", type=float, default=0.1, help="share of sources in test (split=source)")
        p.set_defaults(func=_import_standard)
    _mos_arguments(imports.add_parser("mos", help="any (image, MOS) table: rating samples"))
    labelled = imports.add_parser("labelled", help="a table of images with known distortions (family, severity, "
                                  "optional mask / RLE / bbox): samples of every task")
    labelled.add_argument("--table", required=True, help="CSV, Parquet or .xlsx: image, family, severity, ...")
    labelled.add_argument("--images", required=True, help="URI that relative image and mask names are resolved against")
    labelled.add_argument("--output", required=True, help="output folder or .parquet URI")
    labelled.add_argument("--test-fraction", type=float, default=0.1)
    labelled.set_defaults(func=_import_labelled)
    # `data import-mos`: the name this command had before `data import`; kept for scripts that use it.
    _mos_arguments(data.add_parser("import-mos", help="the same as `data import mos`"))

    photos = data.add_parser("builtin-photos", help="write scikit-image's bundled photos (no download)")
    photos.add_argument("--out", required=True)
    photos.set_defaults(func=_builtin_photos)
    generated = data.add_parser("generated", help="write generated pristine images (dead leaves): as many "
                                "distinct contents as wanted, no download")
    generated.add_argument("--out", required=True)
    generated.add_argument("--count", type=int, default=1000)
    generated.add_argument("--seed", type=int, default=0, help="image i is drawn from (seed, i)")
    generated.add_argument("--side", type=int, default=448, help="square side in pixels")
    generated.set_defaults(func=_generated)
