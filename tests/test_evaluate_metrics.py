"""Evaluation metrics against hand-computed values (and scipy for the correlations)."""
import math

import numpy as np
import pytest
from scipy import stats

from iqa_spider.data import rle
from iqa_spider.evaluate.metrics import (
    PRF,
    answer_level,
    compute_metrics,
    distortion_families,
    distortion_pairs,
    flatten_metrics,
    grounding_sample_metrics,
    iou,
    logistic4,
    plcc,
    point_in_mask,
    rating_metrics,
    srcc,
    target_mask,
)


def test_srcc_matches_scipy_and_is_nan_when_undefined():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert srcc(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert srcc([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert srcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(srcc([1.0], [2.0])) and math.isnan(srcc([1, 1, 1], [1, 2, 3]))


def test_plcc_after_the_logistic_fit():
    x = np.linspace(-3, 3, 40)
    y = logistic4(x, 5.0, 1.0, 0.3, 0.8)          # a monotone but nonlinear relation
    value, how = plcc(x, y)
    assert how == "logistic" and value == pytest.approx(1.0, abs=1e-6)
    linear, how_lin = plcc(x, y, fit=False)
    assert how_lin == "linear" and linear == pytest.approx(stats.pearsonr(x, y).statistic)
    assert linear < 0.999                           # the fit is what makes it 1
    few, how_few = plcc([1, 2, 3], [2, 4, 7])       # too few points to fit 4 parameters
    assert how_few == "linear" and few == pytest.approx(stats.pearsonr([1, 2, 3], [2, 4, 7]).statistic)


def test_logistic4_limits():
    assert logistic4(-1e9, 5, 1, 0, 1) == pytest.approx(1.0)
    assert logistic4(1e9, 5, 1, 0, 1) == pytest.approx(5.0)
    assert logistic4(0.0, 5, 1, 0, 1) == pytest.approx(3.0)


def test_rating_metrics_perfect():
    pred = [1.2, 2.5, 3.1, 4.0, 4.8, 3.6]
    m = rating_metrics(pred, [2 * p for p in pred], ["bad", "good"], ["bad", "fair"])
    assert m["srcc"] == pytest.approx(1.0) and m["plcc"] == pytest.approx(1.0) and m["plcc_linear"] == pytest.approx(1.0)
    assert m["level_acc"] == pytest.approx(0.5) and m["n"] == 6


def test_iou_and_point_in_mask():
    a = np.zeros((4, 4), bool)
    a[:2, :2] = True
    b = np.zeros((4, 4), bool)
    b[:2, :] = True
    assert iou(a, b) == pytest.approx(4 / 8)
    assert iou(a, a) == 1.0 and iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert point_in_mask(1.9, 1.2, a) and not point_in_mask(2.0, 0.0, a)
    assert point_in_mask(-3, -3, a)      # clamped into the image
    assert not point_in_mask(99, 99, a)


def test_grounding_sample_metrics_and_the_whole_image_rule():
    truth = np.zeros((10, 10), bool)
    truth[:5, :5] = True
    pred = truth.copy()
    assert grounding_sample_metrics(False, [(2, 2)], pred, truth, False) == (1.0, 1.0)
    hit, i = grounding_sample_metrics(False, [(8, 8)], np.zeros_like(truth), truth, False)
    assert (hit, i) == (0.0, 0.0)
    assert grounding_sample_metrics(False, [], None, truth, False) == (0.0, 0.0)
    whole = np.ones((10, 10), bool)
    assert grounding_sample_metrics(True, [], None, whole, True) == (1.0, 1.0)
    hit, i = grounding_sample_metrics(True, [], None, truth, False)
    assert hit == 0.0 and i == pytest.approx(0.25)


def test_answer_parsing():
    text = "Severe noise appears in the sky in the top left of the image. Mild blur, moderate jpeg."
    assert distortion_families(text) == {"noise", "blur"}
    assert distortion_pairs(text) == {("noise", 4), ("blur", 1)}
    assert distortion_families("Moderate contrast-weakening, mild pixelation.") == {"contrast_weaken", "pixelate"}
    assert answer_level("Noise is severe. Overall, the quality of the image is poor.") == "poor"
    assert answer_level("The image looks good. Nothing else") == "good"
    assert answer_level("No level here.") is None


def test_prf_micro_average():
    p = PRF()
    p.add({"a", "b"}, {"a"})
    p.add(set(), {"c"})
    p.add(set(), set())
    assert p.precision == pytest.approx(1 / 2) and p.recall == pytest.approx(1 / 2) and p.f1 == pytest.approx(1 / 2)
    assert p.exact == 1 and p.n == 3
    empty = PRF()
    empty.add(set(), set())
    assert empty.precision == empty.recall == empty.f1 == 1.0


def test_target_mask_is_the_union_of_target_regions():
    m1 = np.zeros((6, 8), bool)
    m1[:3, :4] = True
    m2 = np.zeros((6, 8), bool)
    m2[3:, 4:] = True
    target = {"regions": [{"region_id": "r0", "mask_rle": rle.encode(m1)}, {"region_id": "r1", "mask_rle": rle.encode(m2)}],
              "target_region_ids": ["r1"], "whole_image": False}
    assert (target_mask(target, 8, 6) == m2).all()
    assert target_mask({**target, "whole_image": True}, 8, 6).all()


def perfect_samples():
    mappings = ("paper", "expected_bin_centre")
    g = {"task": "grounding", "subtask": "hyd", "position_ok": 1.0, "whole_image": False, "truth_whole": False}
    for which in ("mapping", "forced"):
        for m in mappings:
            g[f"{which}.{m}.hit"], g[f"{which}.{m}.iou"] = 1.0, 1.0
    samples = [dict(g), {**g, "subtask": "sid"}]
    samples += [{"task": "rating", "score": s, "target_score": s, "level": lv, "target_level": lv}
                for s, lv in ((1.5, "bad"), (2.2, "poor"), (3.0, "fair"), (3.9, "good"), (4.6, "excellent"))]
    samples.append({"task": "referring_short", "pred": "Severe noise, mild blur.", "truth_families": ["blur", "noise"],
                    "truth_pairs": ["blur:1", "noise:4"]})
    samples.append({"task": "referring_long", "pred": "No visible distortion.", "truth_families": [], "truth_pairs": []})
    samples.append({"task": "global_desc", "pred": "Severe noise appears in the sky in the top left of the image. "
                    "Overall, the quality of the image is poor.", "truth_families": ["noise"],
                    "truth_pairs": ["noise:4"], "truth_positions": ["top left"], "target_level": "poor"})
    samples.append({"task": "local_desc", "pred": "Mild blur. The quality of this region is good.",
                    "truth_families": ["blur"], "truth_pairs": ["blur:1"]})
    return samples, mappings


def test_perfect_predictions_score_one():
    samples, mappings = perfect_samples()
    metrics = compute_metrics(samples, mappings, "expected_bin_centre")
    flat = flatten_metrics(metrics)
    for key, value in flat.items():
        if key.endswith((".n", "plcc_fit_logistic", ".position_n", ".position_excluded")):
            continue
        assert value == pytest.approx(1.0), key
    assert metrics["grounding"]["all"]["n"] == 2 and set(metrics["grounding"]) == {"hyd", "sid", "all"}
    assert metrics["rating"]["plcc_fit_logistic"] == 1.0


def test_wrong_predictions_score_low():
    samples, mappings = perfect_samples()
    for s in samples:
        if s["task"] == "grounding":
            for k in list(s):
                if k.endswith(".hit") or k.endswith(".iou"):
                    s[k] = 0.0
            s["position_ok"] = 0.0
        if s["task"] == "rating":
            s["score"] = 6 - s["target_score"]
        if "pred" in s:
            s["pred"] = "Extreme quantization in the bottom right. Overall, the quality of the image is excellent."
    m = flatten_metrics(compute_metrics(samples, mappings, "paper"))
    assert m["grounding.all.point_acc"] == 0.0 and m["grounding.all.miou"] == 0.0
    assert m["rating.srcc"] == pytest.approx(-1.0)
    assert m["referring_short.type_f1"] == 0.0 and m["global_desc.level_acc"] == 0.0
    assert m["global_desc.position_f1"] == 0.0


def test_flatten_drops_undefined_values():
    assert flatten_metrics({"a": {"b": float("nan"), "c": 1}, "d": 2.0}) == {"a.c": 1.0, "d": 2.0}


def test_plcc_on_noisy_data_equals_scipy_fit_then_pearson():
    """PLCC = Pearson(logistic4 fitted by scipy's curve_fit on pred -> truth, truth)."""
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(3)
    pred = rng.uniform(1, 5, 60)
    truth = 1 + 4 / (1 + np.exp(-(pred - 3) * 1.7)) + rng.normal(0, 0.3, 60)
    params, _ = curve_fit(logistic4, pred, truth, p0=[truth.max(), truth.min(), pred.mean(), pred.std()], maxfev=20000)
    expected = stats.pearsonr(logistic4(pred, *params), truth).statistic
    value, how = plcc(pred, truth)
    assert how == "logistic" and value == pytest.approx(expected, abs=1e-6)
    assert value >= stats.pearsonr(pred, truth).statistic - 1e-9   # the fit never hurts here
    assert srcc(pred, truth) == pytest.approx(stats.spearmanr(pred, truth).statistic)
    # hand-computed ranks: pred ranks (1, 3, 2, 4) vs truth ranks (1, 2, 3, 4): rho = 1 - 6*2/(4*15) = 0.8
    assert srcc([0.1, 0.9, 0.5, 2.0], [1, 2, 3, 4]) == pytest.approx(0.8)


def test_referring_type_acc_is_exact_family_set_match():
    rs = [{"task": "referring_short", "pred": p, "truth_families": t, "truth_pairs": []}
          for p, t in (("Severe noise, mild blur.", ["blur", "noise"]),   # right
                       ("Severe noise.", ["blur", "noise"]),              # one missing: wrong
                       ("No visible distortion.", []),                    # a clean region: right
                       ("Mild blur.", []))]                               # wrong
    m = compute_metrics(rs, (), "paper")["referring_short"]
    assert m["type_acc"] == pytest.approx(0.5)


def global_desc(pred, positions):
    return {"task": "global_desc", "pred": pred, "truth_families": ["noise"], "truth_pairs": [],
            "truth_positions": positions, "target_level": "poor"}


def test_global_desc_position_f1_leaves_out_samples_without_truth_positions():
    ss = [global_desc("Noise in the top left. Overall, the quality of the image is poor.", ["top left"]),
          # a whole-image distortion or a clean image: no truth position; its mention would be a
          # false positive, its silence a perfect score: either way it says nothing about positions
          global_desc("Noise in the bottom right. Overall, the quality of the image is poor.", []),
          global_desc("Noise. Overall, the quality of the image is poor.", [])]
    d = compute_metrics(ss, (), "paper")["global_desc"]
    assert d["position_f1"] == 1.0 and d["position_precision"] == 1.0
    assert d["position_n"] == 1 and d["position_excluded"] == 2 and d["n"] == 3
    # none left: position F1 is undefined (absent), not perfect
    d = compute_metrics(ss[1:], (), "paper")["global_desc"]
    assert "position_f1" not in d and d["position_n"] == 0 and d["position_excluded"] == 2


def test_chance_baselines_on_a_hand_made_truth():
    from iqa_spider.evaluate.chance import chance_baselines

    def g(sub, pos, frac, whole=False):
        return {"task": "grounding", "subtask": sub, "truth_position": pos, "truth_area_frac": frac,
                "truth_whole": whole}

    samples = [g("hyd", "top left", 0.1), g("hyd", "top left", 0.3), g("hyd", "bottom right", 0.2),
               g("hyd", "whole image", 1.0, True), g("sid", "bottom left", 0.5)]
    samples += [{"task": "referring_short", "pred": "x", "truth_families": t, "truth_pairs": []}
                for t in (["blur"], ["blur"], ["noise"], ["blur", "noise"], [])]
    samples += [global_desc("x", p) for p in (["top left"], ["top left", "bottom right"], [])]
    samples[-1]["truth_families"] = ["blur"]
    samples += [{"task": "rating", "score": p, "target_score": s, "target_level": lv}
                for p, s, lv in ((3.0, 2.0, "poor"), (2.0, 2.1, "poor"), (4.0, 4.0, "good"))]
    chance, basis = chance_baselines(samples, ["paper", "expected_bin_centre"])
    flat = flatten_metrics(chance)
    hyd = chance["grounding"]["hyd"]
    assert hyd["point_acc"] == pytest.approx((0.1 + 0.3 + 0.2 + 1.0) / 4)     # mean truth coverage
    assert hyd["miou"] == pytest.approx(hyd["point_acc"])
    assert hyd["position_acc"] == pytest.approx(2 / 4)                         # always "top left"
    assert hyd["whole_image_acc"] == pytest.approx(3 / 4)
    assert hyd["mapping"]["paper"]["point_acc"] == hyd["point_acc"] == hyd["forced"]["expected_bin_centre"]["point_acc"]
    assert chance["grounding"]["all"]["point_acc"] == pytest.approx((0.1 + 0.3 + 0.2 + 1.0 + 0.5) / 5)
    assert chance["grounding"]["all"]["position_acc"] == pytest.approx(2 / 5)
    assert "'top left'" in basis["grounding.hyd.position_acc"]
    # referring: the most frequent truth family set is {blur} (2 of 5)
    assert flat["referring_short.type_acc"] == pytest.approx(2 / 5) and "'blur'" in basis["referring_short.type_acc"]
    # always naming blur (in 3 of 5 truths): tp 3, fp 2, fn 2 (noise twice) -> P = R = F1 = 3/5
    assert flat["referring_short.type_precision"] == pytest.approx(3 / 5)
    assert flat["referring_short.type_f1"] == pytest.approx(3 / 5)
    # global_desc: noise in 2 of 3 -> tp 2, fp 1, fn 1; positions over the 2 samples with one:
    # always "top left": tp 2, fp 0, fn 1
    assert flat["global_desc.type_f1"] == pytest.approx(2 / 3)
    assert flat["global_desc.position_precision"] == 1.0 and flat["global_desc.position_recall"] == pytest.approx(2 / 3)
    assert flat["global_desc.level_acc"] == 1.0
    assert flat["rating.srcc"] == 0.0 and flat["rating.level_acc"] == pytest.approx(2 / 3)
    # chance keys are metric keys
    metric_keys = set(flatten_metrics(compute_metrics(
        [{**s, **({"mapping.paper.hit": 0.0, "mapping.paper.iou": 0.0, "forced.paper.hit": 0.0,
                   "forced.paper.iou": 0.0, "mapping.expected_bin_centre.hit": 0.0,
                   "mapping.expected_bin_centre.iou": 0.0, "forced.expected_bin_centre.hit": 0.0,
                   "forced.expected_bin_centre.iou": 0.0, "position_ok": 0.0, "whole_image": False}
                  if s["task"] == "grounding" else {}), "level": "fair"} for s in samples],
        ["paper", "expected_bin_centre"], "paper")))
    assert set(flat) <= metric_keys, set(flat) - metric_keys


def test_truth_stratum_from_extent_and_worst_severity():
    from iqa_spider.evaluate.metrics import truth_stratum

    whole, corner = np.ones((4, 6), bool), np.zeros((4, 6), bool)
    corner[:2, :3] = True

    def region(mask, *severities):
        return {"mask_rle": rle.encode(mask), "distortions": [{"type": "noise", "severity": s} for s in severities]}

    assert truth_stratum([], 6, 4) == "clean"
    assert truth_stratum([region(whole)], 6, 4) == "clean"                      # a region with no damage
    assert truth_stratum([region(whole, 4)], 6, 4) == "whole_strong"
    assert truth_stratum([region(whole, 3)], 6, 4) == "whole_weak"
    assert truth_stratum([region(corner, 2, 5)], 6, 4) == "local_strong"       # the worst severity decides
    assert truth_stratum([region(corner, 1), region(whole)], 6, 4) == "local_weak"   # the clean whole is not damage


def test_referring_and_description_metrics_per_truth_stratum_beside_their_own_chance():
    from iqa_spider.evaluate.chance import chance_baselines

    def ref(pred, truth, stratum):
        return {"task": "referring_short", "pred": pred, "truth_families": truth, "truth_pairs": [],
                "truth_stratum": stratum}

    samples = [ref("Severe noise.", ["noise"], "whole_strong"), ref("Severe blur.", ["noise"], "whole_strong"),
               ref("Severe blur.", ["blur"], "whole_strong"), ref("Mild blur.", ["noise"], "local_weak"),
               ref("No visible distortion.", [], "clean"),
               {**global_desc("Noise.", []), "truth_stratum": "whole_strong"},
               {**global_desc("Blur.", []), "truth_stratum": "local_weak"}]
    m = compute_metrics(samples, (), "paper")
    strata = m["referring_short"]["by_stratum"]
    assert set(strata) == {"whole_strong", "local_weak", "clean"}              # only the strata present
    assert strata["whole_strong"] == {"n": 3.0, "type_acc": pytest.approx(2 / 3)}
    assert strata["local_weak"]["type_acc"] == 0.0 and strata["clean"]["type_acc"] == 1.0
    assert m["referring_short"]["type_acc"] == pytest.approx(3 / 5)           # the split-wide figure is unchanged
    desc = m["global_desc"]["by_stratum"]
    assert desc["whole_strong"]["type_f1"] == 1.0 and desc["local_weak"]["type_f1"] == 0.0
    chance, basis = chance_baselines(samples, [])
    # each stratum's own majority: {noise} in 2 of 3 whole_strong truths; the counts are the metrics'
    assert chance["referring_short"]["by_stratum"]["whole_strong"] == {"type_acc": pytest.approx(2 / 3)}
    assert "own majority" in basis["referring_short.by_stratum.whole_strong.type_acc"]
    assert chance["global_desc"]["by_stratum"]["local_weak"]["type_f1"] == 1.0   # always naming noise
    flat = flatten_metrics(m)
    assert flat["referring_short.by_stratum.whole_strong.type_acc"] == pytest.approx(2 / 3)
    # records from before the strata (no truth_stratum) give no section, not an empty one
    assert "by_stratum" not in compute_metrics([{k: v for k, v in s.items() if k != "truth_stratum"}
                                                for s in samples], (), "paper")["referring_short"]


def test_referring_chance_reads_the_region_the_question_names():
    """Only whole-image damage is asked about as the whole image, so with no local damage in
    the data a quadrant question is about a clean image: a constant answer per region the
    question names gets those right without the image."""
    from iqa_spider.evaluate.chance import chance_baselines

    def ref(question, truth):
        return {"task": "referring_short", "pred": "x", "question": question, "truth_families": truth,
                "truth_pairs": []}

    samples = [ref("What distortions affect the whole image?", ["noise"]),
               ref("Which distortions can be seen in the whole image?", ["blur"]),
               ref("What distortions affect the whole image?", ["noise"]),
               ref("What distortions affect the bottom left region of the image?", []),
               ref("What is wrong with the quality of the top right region of the image?", [])]
    chance, basis = chance_baselines(samples, [])
    # whole image: 'noise' right 2 of 3; each quadrant: 'none' right 1 of 1 -> 4 of 5
    # (one constant answer for all would get 2 of 5)
    assert chance["referring_short"]["type_acc"] == pytest.approx(4 / 5)
    assert "bottom left: 'none'" in basis["referring_short.type_acc"]
    assert "whole image: 'noise'" in basis["referring_short.type_acc"]
    # naming noise on whole-image questions and nothing on quadrants: tp 2, fp 1, fn 1
    assert chance["referring_short"]["type_f1"] == pytest.approx(2 / 3)
