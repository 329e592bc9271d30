"""bench/quality.py's decisions, on hand-made reports: which text-to-point mapping becomes the
default (only one that beats `paper` by more than the seed-to-seed spread), and the shape of
bench/results/quality.json that readers of the benchmark rely on."""
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import quality


def _report(point: dict[str, float], miou: dict[str, float], **metrics) -> dict:
    hyd = {"position_acc": metrics.get("position_acc", 0.5), "point_acc": point["expected_bin_centre"],
           "miou": miou["expected_bin_centre"],
           "mapping": {m: {"point_acc": point[m], "miou": miou[m]} for m in point},
           # the true answers teacher-forced: here each mapping 0.1 better on point-in-mask
           "forced": {m: {"point_acc": point[m] + 0.1, "miou": miou[m]} for m in point}}
    return {"metrics": {"referring_short": {"type_acc": metrics.get("type_acc", 0.3)}, "rating": {"srcc": 0.4},
                        "grounding": {"hyd": hyd}, "global_desc": {"type_f1": 0.2}},
            "chance": {"referring_short": {"type_acc": 0.2}, "rating": {"srcc": 0.0},
                       "grounding": {"hyd": {"position_acc": 0.25, "point_acc": 0.3, "miou": 0.3}},
                       "global_desc": {"type_f1": 0.1}},
            "chance_basis": {}, "images": 10, "samples": 40}


def test_the_default_mapping_must_beat_paper_by_more_than_the_seed_spread():
    seeds = [_report({"paper": 0.30, "expected_bin_centre": 0.50}, {"paper": 0.20, "expected_bin_centre": 0.35}),
             _report({"paper": 0.32, "expected_bin_centre": 0.52}, {"paper": 0.21, "expected_bin_centre": 0.36})]
    name, why = quality.choose_mapping(quality.mapping_figures(seeds))
    assert name == "expected_bin_centre" and "beats paper" in why
    noisy = [_report({"paper": 0.30, "expected_bin_centre": 0.50}, {"paper": 0.20, "expected_bin_centre": 0.35}),
             _report({"paper": 0.55, "expected_bin_centre": 0.40}, {"paper": 0.40, "expected_bin_centre": 0.30})]
    name, why = quality.choose_mapping(quality.mapping_figures(noisy))
    assert name == "paper" and "seed spread" in why
    # one seed has no spread to measure: nothing can beat paper by more than an unknown spread
    name, _ = quality.choose_mapping(quality.mapping_figures(seeds[:1]))
    assert name == "paper"


def test_summary_has_the_documented_shape():
    reports = [_report({"paper": 0.3, "expected_bin_centre": 0.5}, {"paper": 0.2, "expected_bin_centre": 0.35},
                       type_acc=0.45)]
    control = _report({"paper": 0.3, "expected_bin_centre": 0.3}, {"paper": 0.2, "expected_bin_centre": 0.2},
                      type_acc=0.21)
    trains = [{"steps": 100, "global_batch": 16, "wall_s": 600.0}]
    q = quality.summarise(reports, control, trains, minutes=12.0, params=5_000_000)
    assert set(q["metrics"]) == {"referring_short.type_acc", "rating.srcc", "grounding.hyd.position_acc",
                                 "grounding.hyd.point_acc", "grounding.hyd.miou", "global_desc.type_f1"}
    assert q["metrics"]["referring_short.type_acc"] == 0.45 and q["shuffled"]["referring_short.type_acc"] == 0.21
    assert q["chance"]["grounding.hyd.position_acc"] == 0.25 and q["chance"]["referring_short.type_acc"] == 0.2
    assert q["mappings"]["paper"]["seeds"] == [0.3] and q["default_mapping"] == "paper"
    assert q["mappings_forced"]["expected_bin_centre"]["seeds"] == [0.6]
    assert "| expected_bin_centre, true answers forced | 0.600 |" in quality.markdown(q)
    assert (q["params"], q["steps"], q["minutes"], q["command"]) == (5_000_000, 100, 12.0, "make quality")
    assert "| referring_short.type_acc | 0.450 |" in quality.markdown(q)
    assert q["warmup_steps"] == 0 and q["warmup_minutes"] == [] and q["generated_sources"] == 0
    assert quality.summarise(reports, control, trains, minutes=12.0, params=1, generated=500)["generated_sources"] == 500
    warm = quality.summarise(reports, control, trains, minutes=12.0, params=5_000_000,
                             warmups=[{"steps": 40, "wall_s": 120.0}])
    assert (warm["warmup_steps"], warm["warmup_minutes"], warm["steps"]) == (40, [2.0], 100)
    assert q["warmup"] is None and "first stage alone" not in quality.markdown(q)
    # the first stage evaluated alone: its figures beside its own chance and shuffled control
    staged = quality.summarise(reports, control, trains, minutes=12.0, params=5_000_000,
                               warmups=[{"steps": 40, "wall_s": 120.0}], warmup_eval=(reports[0], control))
    assert set(staged["warmup"]["metrics"]) == set(quality.WARMUP_HEADLINE)
    assert staged["warmup"]["metrics"]["referring_short.type_acc"] == 0.45
    assert staged["warmup"]["shuffled"]["referring_short.type_acc"] == 0.21
    assert staged["warmup"]["chance"]["referring_short.type_acc"] == 0.2
    assert "| referring_short.type_acc | 0.450 | 0.200 | 0.210 |" in quality.markdown(staged)


def test_the_curriculum_stage_loads_against_the_shipped_configs():
    """--warmup-steps: its annotate overrides keep the quality run's split (the same photos held
    out) and draw strong whole-image damage only; its train overrides drop the long tasks and
    keep the short ones, in the shipped recipe."""
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig, TrainConfig

    ann = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      ["input.uri=a", "output.uri=b", *quality.QUALITY_ANNOTATE, *quality.WARMUP_ANNOTATE])
    full = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                       ["input.uri=a", "output.uri=b", *quality.QUALITY_ANNOTATE])
    assert ann.test_fraction == full.test_fraction and ann.distort.views_per_image == full.distort.views_per_image
    assert (ann.distort.min_severity, ann.distort.whole_image_prob, ann.distort.dao_prob) == (4, 0.85, 0.0)
    cfg = load_config(TrainConfig, REPO / "configs/train/small_cpu.yaml",
                      ["data.uri=d", "model.path=m", "output.uri=o", *quality.WARMUP_TRAIN])
    kept = {t for t, w in cfg.data.task_weights.items() if w > 0}
    assert kept == {"rating", "referring_short", "global_desc"}


def test_the_demo_tier_is_the_demos_data_and_recipe_with_the_steps_given_last(monkeypatch, tmp_path):
    """--data demo: configs/demo.yaml's annotate overrides win over the quality run's own, and
    quality.train() gives the train job the demo's tasks and --steps, over any steps in `extra`
    (the job itself is replaced by one that records its config)."""
    import iqa_spider.model.tiny as tiny
    import iqa_spider.train.job as job
    from iqa_spider.config import load_config
    from iqa_spider.config.schemas import AnnotateConfig

    ann = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      ["input.uri=a", "output.uri=b", *quality.QUALITY_ANNOTATE, *quality.DEMO_ANNOTATE])
    assert (ann.regions.method, sorted(ann.distort.families), ann.distort.views_per_image) == (
        "grid", ["darken", "saturate_weaken"], 16)
    assert quality.DEMO_STEPS == 400
    seen = []
    monkeypatch.setattr(tiny, "init_tiny", lambda family, path, seed, size: f"{path}-{family}-{size}")
    monkeypatch.setattr(job, "run_train", lambda cfg: seen.append(cfg) or {"checkpoint": str(tmp_path / "ckpt")})
    model_dir, summary = quality.train(tmp_path, tmp_path / "data", 1, 600,
                                       extra=(*quality.DEMO_TRAIN, "optim.max_steps=7"))
    (cfg,) = seen
    assert (cfg.optim.max_steps, summary["steps"], cfg.optim.seed) == (600, 600, 1)
    assert cfg.model.path.endswith(f"small_seed1-{quality.FAMILY}-small")
    assert {t for t, w in cfg.data.task_weights.items() if w > 0} == {
        "rating", "grounding", "referring_short", "global_desc"}
    assert model_dir.startswith(str(tmp_path / "ckpt"))


def test_summary_gives_seed_0_per_stratum_of_the_truth_beside_its_chance_and_control():
    def with_strata(report: dict, acc: float) -> dict:
        report["metrics"]["referring_short"]["by_stratum"] = {"whole_strong": {"n": 12.0, "type_acc": acc}}
        report["chance"]["referring_short"]["by_stratum"] = {"whole_strong": {"type_acc": 0.25}}
        return report

    mapped = {"paper": 0.3, "expected_bin_centre": 0.3}
    reports = [with_strata(_report(mapped, mapped), 0.5)]
    control = with_strata(_report(mapped, mapped), 0.1)
    q = quality.summarise(reports, control, [{"steps": 10, "global_batch": 16, "wall_s": 60.0}], 2.0, 1)
    key = "referring_short.by_stratum.whole_strong.type_acc"
    st = q["by_stratum"]
    assert (st["metrics"][key], st["chance"][key], st["shuffled"][key], st["n"][key]) == (0.5, 0.25, 0.1, 12.0)
    assert set(st["metrics"]) == set(quality.STRATUM_KEYS)
    table = quality.markdown(q)
    assert "| referring_short.type_acc, whole_strong | 12 | 0.500 | 0.250 | 0.100 |" in table
    assert "local_weak" not in table                 # a stratum with no sample has no row
