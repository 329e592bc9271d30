"""The importers of the standard IQA sets and of labelled tables (docs/datasets-standard.md), each
on a small fixture folder in the set's published layout: row counts, the MOS mapping onto 1..5,
the split by reference, the distortion names, and that `read_dataset` validates the output."""
import io
import json
import os
import subprocess
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import BIN
from iqa_spider.annotate.importers.kadid import import_kadid
from iqa_spider.annotate.importers.koniq import import_koniq
from iqa_spider.annotate.importers.labelled import import_labelled
from iqa_spider.annotate.importers.spaq import import_spaq
from iqa_spider.annotate.importers.tid2013 import import_tid
from iqa_spider.annotate.truth import Region, Truth, level_for_score
from iqa_spider.data import rle
from iqa_spider.data.io import read_dataset
from iqa_spider.data.schema import image_id, split_for
from iqa_spider.vocab import SCORE_ANSWER_PREFIX


def picture(seed: int, fmt: str = "PNG", size=(40, 30)) -> bytes:
    """A distinct small image (its own bytes, so its own image_id)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write(path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def rows_by_uri(out) -> dict:
    return {os.path.basename(r["image_uri"]): r for r in read_dataset(str(out)).to_pylist()}


def record_of(out, dataset: str) -> dict:
    return json.loads((out / f"{dataset}.import.json").read_text())


def check_split_by_reference(rows: dict, reference_of, dataset: str, fraction: float) -> None:
    sides = defaultdict(set)
    for name, row in rows.items():
        sides[reference_of(name)].add(row["split"])
    assert all(len(s) == 1 for s in sides.values()), sides  # every version of one photo on one side
    assert {ref: s.pop() for ref, s in sides.items()} == {
        ref: split_for(f"{dataset}/{ref}", fraction) for ref in sides}
    assert {r["split"] for r in rows.values()} == {"train", "test"}


# ---------------------------------------------------------------- KonIQ-10k

def koniq_layout(root, with_sets: bool = False) -> dict:
    """koniq10k_scores_and_distributions.csv (MOS on 1..5 beside MOS_zscore on 0..100) or
    koniq10k_distributions_sets.csv (MOS on 0..100, and set), with 1024x768/."""
    mos = {"826373.jpg": 3.9, "10004473376.jpg": 1.2, "0001.jpg": 5.0, "58.jpg": 2.6}
    sets = {"826373.jpg": "training", "10004473376.jpg": "validation", "0001.jpg": "test", "58.jpg": "test"}
    header = ("image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,set" if with_sets
              else "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore")
    lines = [header]
    for k, (name, m) in enumerate(mos.items()):
        write(root / "1024x768" / name, picture(k, "JPEG"))
        rescaled = round((m - 1) * 25, 3)  # the sets table's MOS: the same opinion on 0..100
        lines.append(f"{name},1,2,3,4,5,15,{rescaled},0.5,{sets[name]}" if with_sets
                     else f"{name},1,2,3,4,5,15,{m},0.5,{rescaled}")
    tail = "training" if with_sets else "50"
    lines.append(f"missing.jpg,1,2,3,4,5,15,50,0.5,{tail}" if with_sets else "missing.jpg,1,2,3,4,5,15,3.0,0.5,50")
    write(root / "1024x768" / "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    lines.append(f"broken.jpg,1,2,3,4,5,15,50,0.5,{tail}" if with_sets else "broken.jpg,1,2,3,4,5,15,3.0,0.5,50")
    table = "koniq10k_distributions_sets.csv" if with_sets else "koniq10k_scores_and_distributions.csv"
    write(root / table, "\n".join(lines) + "\n")
    return {"mos": mos, "sets": sets, "table": str(root / table)}


def test_koniq_import_keeps_its_1_to_5_mos_and_splits_by_image(tmp_path):
    fixture = koniq_layout(tmp_path / "koniq")
    out = tmp_path / "out"
    rec = import_koniq(str(tmp_path / "koniq"), str(out), test_fraction=0.5)
    assert (rec["rows"], rec["imported"], rec["skipped"]) == (6, 4, {"unreadable": 1, "corrupt": 1})
    assert rec["scale"] == {"low": 1.0, "high": 5.0, "higher_is_better": True,
                            "quality_score": "1 + 4 * (mos - 1) / 4"}
    rows = rows_by_uri(out)
    assert set(rows) == set(fixture["mos"])  # "0001.jpg" stays a name, not the number 1
    for name, row in rows.items():
        score = fixture["mos"][name]
        assert row["task"] == "rating" and row["target"]["quality_score"] == pytest.approx(score)
        assert row["answer"] == f"{SCORE_ANSWER_PREFIX} {level_for_score(score)}."
        assert row["split"] == split_for(row["image_id"], 0.5)  # authentic: each image its own source
        assert row["target"]["regions"] == [] and (row["width"], row["height"]) == (40, 30)
    assert rec["split"]["mode"] == "source"
    assert rec["split"]["train"]["samples"] + rec["split"]["test"]["samples"] == 4


def test_koniq_sets_table_gives_the_official_split(tmp_path):
    fixture = koniq_layout(tmp_path / "koniq", with_sets=True)
    out = tmp_path / "out"
    rec = import_koniq(str(tmp_path / "koniq"), str(out), table=fixture["table"])
    rows = rows_by_uri(out)
    assert rec["split"]["mode"] == "official" and rec["imported"] == 4 and rec["clamped"] == 0
    # the sets table's MOS is on 0..100: the same opinions land on the same 1..5 scores
    assert rec["scale"]["quality_score"] == "1 + 4 * (mos - 0) / 100"
    assert {n: r["target"]["quality_score"] for n, r in rows.items()} == pytest.approx(fixture["mos"])
    assert {n: r["split"] for n, r in rows.items()} == {
        "826373.jpg": "train", "10004473376.jpg": "train", "0001.jpg": "test", "58.jpg": "test"}
    # the whole set as test: the cross-set protocol of the anchors
    rec = import_koniq(str(tmp_path / "koniq"), str(tmp_path / "all"), split="test")
    assert {r["split"] for r in rows_by_uri(tmp_path / "all").values()} == {"test"}
    assert rec["split"]["test"]["samples"] == 4


# ---------------------------------------------------------------- SPAQ

def test_spaq_import_reads_the_xlsx_sheet_and_maps_0_100_onto_1_5(tmp_path):
    from openpyxl import Workbook

    root = tmp_path / "SPAQ"
    mos = {"00001.jpg": 0.0, "00002.jpg": 50.0, "00003.jpg": 100.0, "00004.jpg": 72.5}
    book = Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"])
    for k, (name, m) in enumerate(mos.items()):
        write(root / "TestImage" / name, picture(10 + k, "JPEG"))
        sheet.append([name, m, 50, 50, 50, 50, 50])
    sheet.append(["00005.jpg", None, 50, 50, 50, 50, 50])  # no MOS
    (root / "Annotations").mkdir(parents=True)
    book.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    out = tmp_path / "out"
    rec = import_spaq(str(root), str(out))
    assert (rec["rows"], rec["imported"], rec["skipped"]) == (5, 4, {"no_mos": 1})
    assert rec["scale"]["quality_score"] == "1 + 4 * (mos - 0) / 100"
    got = {n: r["target"]["quality_score"] for n, r in rows_by_uri(out).items()}
    assert got == pytest.approx({"00001.jpg": 1.0, "00002.jpg": 3.0, "00003.jpg": 5.0, "00004.jpg": 3.9})


# ---------------------------------------------------------------- KADID-10k

KADID_REFS = ("I01", "I02", "I03")  # split_for puts I01 in test and I02, I03 in train at 0.5


def kadid_layout(root) -> dict:
    """dmos.csv (dist_img, ref_img, dmos, var) and images/ with the references and I01_01_03.png ..."""
    lines, dmos = ["dist_img,ref_img,dmos,var"], {}
    for r, ref in enumerate(KADID_REFS):
        write(root / "images" / f"{ref}.png", picture(100 + r))
        for dtype in (1, 4, 8):       # gaussian blur, color diffusion (no family of ours), color saturation 2
            for level in (1, 5):
                name = f"{ref}_{dtype:02d}_{level:02d}.png"
                write(root / "images" / name, picture(1000 + 100 * r + 10 * dtype + level))
                dmos[name] = round(4.8 - 0.6 * level - 0.05 * dtype, 3)
                lines.append(f"{name},{ref}.png,{dmos[name]},0.1")
    write(root / "dmos.csv", "\n".join(lines) + "\n")
    return dmos


def test_kadid_import_maps_types_keeps_others_and_splits_by_reference(tmp_path):
    dmos = kadid_layout(tmp_path / "kadid10k")
    out = tmp_path / "out"
    rec = import_kadid(str(tmp_path / "kadid10k"), str(out), test_fraction=0.5)
    assert (rec["rows"], rec["imported"], rec["skipped"]) == (18, 18, {})
    assert rec["split"]["test"]["sources"] == 1 and rec["split"]["train"]["sources"] == 2
    rows = rows_by_uri(out)
    assert set(rows) == set(dmos)
    for name, row in rows.items():
        # KADID's "dmos" is a MOS on 1..5, higher = better: not inverted
        assert row["target"]["quality_score"] == pytest.approx(dmos[name])
        (region,) = row["target"]["regions"]
        assert region["region_id"] == "whole" and region["bbox"] == [0.0, 0.0, 1.0, 1.0]
        (d,) = region["distortions"]
        assert d["severity"] == int(name[7:9])
    assert rows["I01_01_05.png"]["target"]["regions"][0]["distortions"] == [
        {"type": "blur", "subtype": "kadid10k:gaussian blur", "severity": 5}]
    assert rows["I02_04_01.png"]["target"]["regions"][0]["distortions"] == [
        {"type": "other", "subtype": "kadid10k:color diffusion", "severity": 1}]
    assert rows["I03_08_01.png"]["target"]["regions"][0]["distortions"][0]["type"] == "saturate_strengthen"
    check_split_by_reference(rows, lambda n: n[:3], "kadid10k", 0.5)


def test_kadid_refuses_names_outside_its_scheme(tmp_path):
    kadid_layout(tmp_path / "k")
    with open(tmp_path / "k" / "dmos.csv", "a") as f:
        f.write("holiday.png,I01.png,3.0,0.1\n")
    with pytest.raises(ValueError, match="'holiday.png' is not a KADID-10k name"):
        import_kadid(str(tmp_path / "k"), str(tmp_path / "out"))


# ---------------------------------------------------------------- TID2013

def test_tid2013_import_maps_0_9_matches_names_without_case_and_splits_by_reference(tmp_path):
    root = tmp_path / "tid2013"
    lines, mos = [], {}
    for r, ref in enumerate(("i01", "i02", "i06")):  # split_for at 0.5: i01, i02 train; i06 test
        write(root / "reference_images" / f"{ref.upper()}.BMP", picture(200 + r, "BMP"))
        for dtype, level in ((1, 1), (8, 4), (23, 5)):
            name = f"{ref}_{dtype:02d}_{level}.bmp"
            on_disk = name.upper() if ref == "i02" else name  # the list and the folder disagree on case
            write(root / "distorted_images" / on_disk, picture(2000 + 100 * r + 10 * dtype + level, "BMP"))
            mos[name] = round(9.0 - 1.5 * level, 5)
            lines.append(f"{mos[name]} {name}")
    write(root / "mos_with_names.txt", "\n".join(lines) + "\n")
    out = tmp_path / "out"
    rec = import_tid(str(root), str(out), test_fraction=0.5)
    assert (rec["rows"], rec["imported"], rec["skipped"]) == (9, 9, {})
    rows = {n.lower(): r for n, r in rows_by_uri(out).items()}
    assert set(rows) == set(mos)
    for name, row in rows.items():
        assert row["target"]["quality_score"] == pytest.approx(1 + 4 * mos[name] / 9, abs=1e-4)
    assert rows["i02_08_4.bmp"]["target"]["regions"][0]["distortions"] == [
        {"type": "blur", "subtype": "tid2013:gaussian blur", "severity": 4}]
    assert rows["i06_23_5.bmp"]["target"]["regions"][0]["distortions"][0] == {
        "type": "other", "subtype": "tid2013:chromatic aberrations", "severity": 5}
    check_split_by_reference(rows, lambda n: n[:3].upper(), "tid2013", 0.5)


# ---------------------------------------------------------------- labelled distortions

def test_labelled_table_yields_every_task_with_the_truth_rules(tmp_path):
    images = tmp_path / "labelled"
    w, h = 64, 48
    for k, name in enumerate(("a.png", "b.png", "c.png", "d.png", "e.png", "g.png")):
        write(images / name, picture(300 + k, size=(w, h)))
    mask = np.zeros((h, w), np.uint8)
    mask[30:48, 40:64] = 255  # bottom right
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    write(images / "masks" / "a_noise.png", buf.getvalue())
    top_left = np.zeros((h, w), bool)
    top_left[0:24, 0:32] = True
    rle_json = json.dumps(rle.encode(top_left)).replace('"', '""')
    write(tmp_path / "table.csv", "\n".join([
        "image,family,severity,subtype,mask,rle,bbox,label,source",
        "a.png,blur,3,,,,0 0 0.5 0.5,sky,scene1",         # a chain in the top-left box: blur then jpeg
        "a.png,compression,2,jpeg,,,0 0 0.5 0.5,sky,scene1",
        "a.png,noise,4,,masks/a_noise.png,,,,scene1",     # a second region by mask
        "b.png,none,,,,,,,scene1",                        # a clean version of the same scene
        f'c.png,pixelate,5,,,"{rle_json}",,,scene2',
        "d.png,sparkle,2,,,,,,scene3",                    # no family of ours
        "e.png,noise,2,,masks/missing.png,,,,scene3",     # a mask that is not there
        "f.png,blur,2,,,,,,scene3",                       # an image that is not there
        "g.png,noise,2,,../table.csv,,,,scene3",          # a mask outside --images
    ]) + "\n")
    out = tmp_path / "out"
    rec = import_labelled(str(tmp_path / "table.csv"), str(images), str(out), test_fraction=0.5)
    assert (rec["rows"], rec["images_listed"], rec["imported"]) == (9, 7, 3)
    assert rec["skipped"] == {"unknown_family": 1, "bad_region": 2, "unreadable": 1}
    assert set(rec["tasks"]) == {"global_desc", "local_desc", "grounding", "referring_short", "referring_long",
                                 "rating"}
    rows = read_dataset(str(out)).to_pylist()
    assert len(rows) == rec["samples"]
    by_image = defaultdict(list)
    for r in rows:
        by_image[os.path.basename(r["image_uri"])].append(r)

    # a.png: the truth rule scores it, the chain is kept in order, positions are where the regions are
    region_box = Region("r0", top_left, "sky", distortions=[_D("blur", 3), _D("compression", 2)])
    region_mask = Region("r1", mask > 0, None, distortions=[_D("noise", 4)])
    expected = Truth([region_box, region_mask], w, h)
    a = by_image["a.png"]
    rating = next(r for r in a if r["task"] == "rating")
    assert rating["target"]["quality_score"] == pytest.approx(expected.quality_score())
    assert rating["answer"] == f"{SCORE_ANSWER_PREFIX} {expected.quality_level()}."
    regions = {r["region_id"]: r for r in rating["target"]["regions"]}
    assert regions["r0"]["position"] == ["top", "left"] and regions["r0"]["label"] == "sky"
    assert [d["type"] for d in regions["r0"]["distortions"]] == ["blur", "compression"]
    assert regions["r0"]["distortions"][1]["subtype"] == "jpeg"
    assert regions["r1"]["position"] == ["bottom", "right"]
    assert rle.decode(regions["r1"]["mask_rle"]).sum() == (mask > 0).sum()
    hyd = next(r for r in a if r["task"] == "grounding" and r["subtask"] == "hyd")
    worst = expected.most_degraded().region_id
    assert hyd["target"]["target_region_ids"] == [worst]
    assert " ".join(regions[worst]["position"]) in hyd["answer"]
    dao = [r for r in a if r["subtask"] == "dao"]
    assert dao and "blur" in dao[0]["question"] and dao[0]["target"]["target_region_ids"] == ["r0"]
    assert any(r["task"] == "global_desc" and "the sky in the top left of the image" in r["answer"] for r in a)

    # b.png: clean; c.png: the RLE region; a and b share a scene, so a split
    b = by_image["b.png"]
    assert next(r for r in b if r["task"] == "rating")["target"]["quality_level"] == "excellent"
    c_regions = next(r for r in by_image["c.png"] if r["task"] == "rating")["target"]["regions"]
    assert c_regions[0]["position"] == ["top", "left"]
    assert {r["split"] for r in a + b} == {split_for("labelled/scene1", 0.5)}
    assert not any(r["image_id"] == image_id((images / "d.png").read_bytes()) for r in rows)


class _D:
    """A distortion as the labelled importer knows it: family, severity, no parameters."""

    def __init__(self, family, severity):
        self.type, self.subtype, self.severity = family, None, severity


# ---------------------------------------------------------------- the command line

def test_a_scale_that_does_not_fit_the_table_is_refused(tmp_path):
    """KonIQ's two tables both name a column MOS, on 1..5 and on 0..100: read on the wrong
    scale, nearly every image would be clamped to excellent. More than 1% outside is an error."""
    from iqa_spider.annotate.importers.mos_table import import_mos

    for k in range(3):
        write(tmp_path / "img" / f"{k}.png", picture(500 + k))
    write(tmp_path / "mos.csv", "image,mos\n0.png,77.4\n1.png,15.2\n2.png,4.5\n")
    with pytest.raises(ValueError, match=r"2 MOS values lie outside the scale \[1, 5\] \(e.g. 77.4\)"):
        import_mos(str(tmp_path / "mos.csv"), str(tmp_path / "img"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    rec = import_mos(str(tmp_path / "mos.csv"), str(tmp_path / "img"), str(tmp_path / "out"), 0, 100)
    assert rec["imported"] == 3 and rec["clamped"] == 0


def test_cli_imports_a_layout_and_refuses_a_folder_that_is_not_one(tmp_path):
    kadid_layout(tmp_path / "kadid10k")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(BIN / "iqa-spider"), "data", "import", "kadid10k", "--root", str(tmp_path / "kadid10k"),
                           "--output", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported 18 rating samples" in proc.stdout and "split (source)" in proc.stdout
    assert len(read_dataset(str(out))) == 18 and record_of(out, "kadid10k")["dataset"] == "kadid10k"
    proc = subprocess.run([str(BIN / "iqa-spider"), "data", "import", "tid2013", "--root", str(tmp_path / "kadid10k"),
                           "--output", str(tmp_path / "tid")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "mos_with_names.txt" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "tid").exists()
    write(tmp_path / "SPAQ" / "Annotations" / "MOS and Image attribute scores.xlsx", b"not a workbook")
    proc = subprocess.run([str(BIN / "iqa-spider"), "data", "import", "spaq", "--root", str(tmp_path / "SPAQ"),
                           "--output", str(tmp_path / "spaq")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and "not a readable .xlsx workbook" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- evaluating on an imported set

def test_an_imported_set_is_evaluated_with_the_anchors_protocol(tmp_path, tiny_model_dir):
    """The evaluation job on a KADID-10k import, the whole set as test (the cross-set protocol):
    SRCC, and PLCC after the 4-parameter logistic fit, against the normalised MOS, which are the
    figures against the raw MOS (a linear map changes neither)."""
    from conftest import REPO
    from iqa_spider.config import load_config
    from iqa_spider.evaluate.config import EvaluateConfig
    from iqa_spider.evaluate.job import evaluate
    from iqa_spider.evaluate.metrics import plcc, srcc

    dmos = kadid_layout(tmp_path / "kadid10k")
    import_kadid(str(tmp_path / "kadid10k"), str(tmp_path / "data"), split="test")
    cfg = load_config(EvaluateConfig, REPO / "configs/evaluate.yaml", [
        f"model.path={tiny_model_dir}", f"data.uri={tmp_path / 'data'}", "model.device=cpu", "data.tasks=[rating]",
        f"output.uri={tmp_path / 'report'}", "mlflow.enabled=false", "output.plots=false"])
    report = evaluate(cfg)
    rating = report["metrics"]["rating"]
    assert rating["n"] == len(dmos) == report["images"] == 18
    assert set(report["metrics"]) == {"rating"}
    for key in ("srcc", "plcc", "plcc_linear"):
        assert -1 - 1e-9 <= rating[key] <= 1 + 1e-9, key
    # the same figures against the raw dmos column: the map onto 1..5 changes nothing
    names = {r["image_id"]: os.path.basename(r["image_uri"]) for r in read_dataset(str(tmp_path / "data")).to_pylist()}
    predictions = pq.read_table(tmp_path / "report" / "predictions.parquet").to_pylist()
    pred, raw = zip(*[(r["score"], dmos[names[r["image_id"]]]) for r in predictions])
    assert len(pred) == 18
    assert srcc(pred, raw) == pytest.approx(rating["srcc"], abs=1e-9)
    assert plcc(pred, raw)[0] == pytest.approx(rating["plcc"], abs=1e-3)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["metrics"]["rating"]["n"] == 18
