"""Gated promotion against a real `mlflow server`: decisions come from real evaluations with
the harness (iqa_spider.evaluate.job) of registered versions downloaded from the server.

Better and worse models. Random tiny models are near chance on every metric, and which of
two random models scores higher depends on the data, so the models here are made by exact
weight surgery on one tiny model, and the evaluation data is made to agree with it:
- ``intact``:   the tiny model as made. The evaluation data's rating truths
  (``target.quality_score``) are set to this model's own Q-Align scores, so its SRCC and
  linear PLCC are 1 by construction;
- ``reversed``: the lm_head rows of the five level words in reverse order, so its level
  probabilities are reversed and its score is exactly 6 - score(intact): SRCC and linear
  PLCC are -1 on the same data (worse by 2, far past any tolerance);
- ``broken``:   lm_head zeroed: every logit is 0, the score is 3 for every image and SRCC /
  PLCC are undefined, so the harness leaves them out and no gate accepts it.
Each test also checks that the metrics the promotion *recorded* show this ordering.
Evaluation data: 3 bundled photos x 2 distorted variants, annotated in-process (no Ray).
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, env_vars, register_model
from iqa_spider.config import load_config
from iqa_spider.registry.config import GateMetric, PromoteConfig

# Floors null: with no champion the candidate only needs defined (finite) values.
GATE = ("gate=[{name: rating.srcc, direction: higher, tolerance: 0.05, floor: null},"
        " {name: rating.plcc_linear, direction: higher, tolerance: 0.05, floor: null}]")


# ------------------------------------------------------------------ fixtures


def _surgery(src: Path, dst: Path, how: str) -> Path:
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from iqa_spider.model.tokenizer import word_token_id
    from iqa_spider.vocab import LEVEL_WORDS

    shutil.copytree(src, dst)
    model = AutoModelForImageTextToText.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        w = model.lm_head.weight
        if how == "reversed":
            ids = [word_token_id(AutoTokenizer.from_pretrained(dst), word) for word in LEVEL_WORDS]
            w[ids] = w[ids[::-1]].clone()
        else:
            w.zero_()
    model.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("promo_models")
    return {"intact": Path(tiny_model_dir), "reversed": _surgery(tiny_model_dir, root / "reversed", "reversed"),
            "broken": _surgery(tiny_model_dir, root / "broken", "zero")}


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, models) -> str:
    """A small four-task dataset, all in the test split, annotated without Ray; its rating
    truths are then replaced by the intact model's own scores (measured by the harness)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from iqa_spider.annotate.pipeline import ShardAnnotator, list_sources, plan_shards, write_builtin_photos
    from iqa_spider.config.schemas import AnnotateConfig
    from iqa_spider.data.io import read_dataset, write_table
    from iqa_spider.data.schema import DATASET_SCHEMA
    from iqa_spider.evaluate.config import EvaluateConfig
    from iqa_spider.evaluate.job import evaluate

    root = tmp_path_factory.mktemp("promo_data")
    write_builtin_photos(str(root / "photos"), limit=3)
    cfg = load_config(AnnotateConfig, REPO / "configs/annotate.yaml",
                      [f"input.uri={root / 'photos'}", f"output.uri={root / 'data'}", "distort.max_side=128",
                       "distort.variants_per_image=2", "test_fraction=1.0"])
    annotator = ShardAnnotator(cfg)
    for shard in plan_shards(list_sources(cfg)[0], cfg):
        annotator({"shard": json.dumps(shard)})
    ecfg = load_config(EvaluateConfig, REPO / "configs/evaluate.yaml",
                       [f"model.path={models['intact']}", f"data.uri={root / 'data'}", "model.device=cpu",
                        "data.tasks=[rating]", f"output.uri={root / 'intact_eval'}", "mlflow.enabled=false",
                        "output.html=false"])
    evaluate(ecfg)
    preds = pq.read_table(root / "intact_eval" / "predictions.parquet").to_pylist()
    score = {p["sample_id"]: p["score"] for p in preds if p["task"] == "rating"}
    rows = read_dataset(str(root / "data")).to_pylist()
    for r in rows:
        if r["task"] == "rating":
            r["target"]["quality_score"] = float(score[r["sample_id"]])
    assert len(set(score.values())) >= 4  # enough distinct scores for a meaningful correlation
    write_table(pa.Table.from_pylist(rows, schema=DATASET_SCHEMA), str(root / "eval.parquet"))
    return str(root / "eval.parquet")


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


def register(client, name: str, model_dir: Path, kind: str) -> str:
    return register_model(client, name, model_dir, "promotion-test-train", {"kind": kind}, {"train_loss": 1.0})


def gate_config(name: str, data: str, cache: Path, *extra: str) -> PromoteConfig:
    return load_config(PromoteConfig, REPO / "configs/gate.yaml",
                       [f"registered_model={name}", f"data.uri={data}", "model.device=cpu", "infer.max_new_tokens=12",
                        "infer.describe_max_new_tokens=16", f"infer.cache_dir={cache}", "lock.poll_s=0.2",
                        "tracking.experiment=promotion-test", GATE, *extra])


def aliases(client, name: str) -> tuple[str | None, str | None]:
    from iqa_spider.registry.aliases import CHAMPION, PREVIOUS, alias_version

    return alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)


# ------------------------------------------------------------------ the gate alone


def test_check_gate_directions_tolerances_floors():
    from iqa_spider.registry.gate import check_gate

    gate = [GateMetric("srcc", "higher", 0.02, 0.5), GateMetric("loss", "lower", 0.1, None)]
    ok = check_gate(gate, {"srcc": 0.79, "loss": 1.05}, {"srcc": 0.8, "loss": 1.0})
    assert [c.passed for c in ok] == [True, True]
    worse = check_gate(gate, {"srcc": 0.7, "loss": 1.2}, {"srcc": 0.8, "loss": 1.0})
    assert [c.passed for c in worse] == [False, False] and "worse than champion" in worse[0].reason
    first = check_gate(gate, {"srcc": 0.4, "loss": 9.0}, None)        # no champion: floors decide
    assert [c.passed for c in first] == [False, True] and "floor" in first[0].reason
    nan = check_gate(gate, {"srcc": math.nan}, {"srcc": 0.1})
    assert [c.passed for c in nan] == [False, False]                  # NaN and missing both fail
    # better metrics, but on one sample fewer than the champion's run: not comparable, refused
    from iqa_spider.registry.gate import SAMPLES

    fewer = check_gate(gate, {"srcc": 0.9, "loss": 0.5, SAMPLES: 40.0}, {"srcc": 0.8, "loss": 1.0, SAMPLES: 41.0})
    assert [c.passed for c in fewer] == [True, True, False] and "not comparable" in fewer[-1].reason
    same = check_gate(gate, {"srcc": 0.9, "loss": 0.5, SAMPLES: 41.0}, {"srcc": 0.8, "loss": 1.0, SAMPLES: 41.0})
    assert [c.passed for c in same] == [True, True, True]


def test_check_gate_above_chance_is_a_floor_relative_to_the_reported_chance():
    """Beat the same samples' chance figure by the margin, with or without a champion; no
    chance figure reported fails rather than passes."""
    from iqa_spider.registry.gate import CHANCE, check_gate

    gate = [GateMetric("referring_short.type_acc", "higher", 0.02, None, above_chance=0.05)]
    key = "referring_short.type_acc"
    passed = check_gate(gate, {key: 0.26, CHANCE + key: 0.2}, None)[0]
    assert passed.passed and "beats chance 0.2000 by at least 0.05 (no champion)" in passed.reason
    both = check_gate([GateMetric(key, "higher", 0.02, 0.25, above_chance=0.05)], {key: 0.26, CHANCE + key: 0.2}, None)[0]
    assert both.passed and "meets the floor 0.25 and beats chance 0.2000 by at least 0.05" in both.reason
    near = check_gate(gate, {key: 0.24, CHANCE + key: 0.2}, None)[0]
    assert not near.passed and "does not beat chance 0.2000 by 0.05" in near.reason
    assert not check_gate(gate, {key: 0.24, CHANCE + key: 0.2}, {key: 0.1})[0].passed  # a champion does not lift it
    missing = check_gate(gate, {key: 0.9}, None)[0]
    assert not missing.passed and "no chance figure" in missing.reason
    with pytest.raises(ValueError, match="higher is better"):
        GateMetric("loss", "lower", 0.1, None, above_chance=0.1)


def test_bad_gate_file_exits_2(tmp_path, capsys):
    from iqa_spider.registry.promotion import main

    bad = tmp_path / "gate.yaml"
    bad.write_text("job: promote\ngate:\n  - {name: rating.srcc, direction: up}\n")
    assert main(["--config", str(bad), "candidate=1", "data.uri=/nowhere"]) == 2
    assert "gate[rating.srcc].direction" in capsys.readouterr().err
    assert main(["--config", str(REPO / "configs/gate.yaml"), "candidate=v1", "data.uri=/x"]) == 2


# ------------------------------------------------------------------ the lock


def test_registry_lock_is_exclusive_and_breaks_stale_leases(client):
    from iqa_spider.registry.config import PromotionLockSettings
    from iqa_spider.registry.lock import RegistryLock

    name = "promo-lock"
    settings = PromotionLockSettings(ttl_s=60, wait_s=60, poll_s=0.05)
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker():
        try:
            for _ in range(2):
                with RegistryLock(client, name, settings):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    threading.Event().wait(0.05)
                    with guard:
                        inside[0] -= 1
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and most[0] == 1

    # No overlap above could also come from threads that never met. Here they must: a second
    # acquirer waits while the lease is held (polling every 0.05 s) and gets it only once the
    # holder has released it.
    first, second = RegistryLock(client, name, settings), RegistryLock(client, name, settings)
    first.acquire()
    got, got_at = threading.Event(), []

    def take():
        try:
            second.acquire()
            got_at.append(time.monotonic())
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
        got.set()

    taker = threading.Thread(target=take)
    taker.start()
    assert not got.wait(0.6), errors or "a second lock was acquired while the first was held"
    assert first.held() and not second.held()
    released_at = time.monotonic()
    first.release()
    assert got.wait(30) and not errors, errors
    taker.join(10)
    assert got_at[0] > released_at and second.held() and not first.held()
    second.release()

    # a crashed holder's lease (expired) is broken by the next promotion
    client.create_registered_model(name + ".promotion-lock", tags={"owner": "dead:1:x", "expires_at": "1.0"})
    lock = RegistryLock(client, name, settings)
    lock.acquire()
    assert lock.held()
    lock.release()
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as gone:
        client.get_registered_model(name + ".promotion-lock")
    assert gone.value.error_code == "RESOURCE_DOES_NOT_EXIST", gone.value


# ------------------------------------------------------------------ promotion end to end


@pytest.fixture(scope="module")
def flow(client, models, eval_data, mlflow_server, tmp_path_factory):
    """broken (refused: no champion, undefined metrics) -> reversed (first champion) ->
    intact (better: promoted) -> reversed again (worse: refused) -> load @champion -> rollback.

    The gate names its server (tracking.uri) while MLFLOW_TRACKING_URI points at an empty store:
    the versions must be read from the gate's server, not the environment's."""
    from iqa_spider.model.loading import resolve_model_path
    from iqa_spider.registry.promotion import promote, rollback

    name = "promo-flow"
    cfg = gate_config(name, eval_data, tmp_path_factory.mktemp("promo_cache"), f"tracking.uri={mlflow_server.uri}")
    v = {kind: register(client, name, models[kind], kind) for kind in ("broken", "reversed", "intact")}
    v["reversed2"] = register(client, name, models["reversed"], "reversed")
    out = {"name": name, "versions": v, "cfg": cfg, "decisions": {}, "aliases": {}}
    elsewhere = f"sqlite:///{tmp_path_factory.mktemp('elsewhere') / 'empty.db'}"
    with env_vars(MLFLOW_TRACKING_URI=elsewhere):
        for step in ("broken", "reversed", "intact", "reversed2"):
            out["decisions"][step] = promote(v[step], eval_data, cfg, client=client)
            out["aliases"][step] = aliases(client, name)
    out["loaded"] = resolve_model_path(f"models:/{name}@champion", cfg.infer.cache_dir)
    out["rollback"] = rollback(name, client=client, gate=cfg)
    out["aliases"]["rollback"] = aliases(client, name)
    return out


def test_first_candidate_must_pass_the_floors(flow):
    d, v = flow["decisions"], flow["versions"]
    assert d["broken"]["decision"] == "refused" and d["broken"]["champion_before"] is None
    assert "rating.srcc" not in d["broken"]["candidate_metrics"]  # constant score: undefined, left out
    assert any("rating.srcc: candidate value None is missing" in r for r in d["broken"]["reasons"])
    assert flow["aliases"]["broken"] == (None, None)                                    # nothing moved
    assert d["reversed"]["decision"] == "promoted", d["reversed"]["reasons"]
    assert flow["aliases"]["reversed"] == (v["reversed"], None)


def test_better_candidate_is_promoted(flow):
    d, v = flow["decisions"]["intact"], flow["versions"]
    assert d["decision"] == "promoted", d["reasons"]
    cand, champ = d["candidate_metrics"], d["champion_metrics"]
    assert d["champion_before"] == v["reversed"]
    # the harness really measured it better: +1 against -1 (the construction is exact)
    assert cand["rating.srcc"] == pytest.approx(1.0) and champ["rating.srcc"] == pytest.approx(-1.0)
    assert cand["rating.plcc_linear"] == pytest.approx(1.0) and champ["rating.plcc_linear"] == pytest.approx(-1.0)
    assert flow["aliases"]["intact"] == (v["intact"], v["reversed"])


def test_worse_candidate_is_refused_and_champion_stays(flow):
    d, v = flow["decisions"]["reversed2"], flow["versions"]
    assert d["decision"] == "refused"
    cand, champ = d["candidate_metrics"], d["champion_metrics"]
    assert cand["rating.srcc"] == pytest.approx(-1.0) and champ["rating.srcc"] == pytest.approx(1.0)
    assert {r.split(":")[0] for r in d["reasons"]} == {"rating.srcc", "rating.plcc_linear"}
    assert all("worse than champion" in r for r in d["reasons"])
    assert flow["aliases"]["reversed2"] == (v["intact"], v["reversed"])       # unchanged


def test_decisions_are_recorded_as_tags_and_runs(flow, client):
    name, v = flow["name"], flow["versions"]
    for step, expected in (("intact", "promoted"), ("reversed2", "refused"), ("broken", "refused")):
        d = flow["decisions"][step]
        tags = client.get_model_version(name, v[step]).tags
        assert tags["promotion.decision"] == expected and tags["promotion.run_id"] == d["run_id"]
        assert tags["promotion.reasons"] and "promotion.candidate.rating.srcc" in tags
        run = client.get_run(d["run_id"])
        assert run.data.tags["decision"] == expected and run.info.status == "FINISHED"
        assert client.get_experiment(run.info.experiment_id).name == "promotion-test"
        assert "candidate.rating.srcc" in run.data.metrics or step == "broken"
        local = client.download_artifacts(d["run_id"], "decision.json")
        recorded = json.loads(Path(local).read_text())
        assert recorded["decision"] == expected and recorded["candidate"] == v[step]
        assert set(recorded["candidate_metrics"]) >= {"rating.n", "grounding.all.miou"}
    run = client.get_run(flow["decisions"]["reversed2"]["run_id"])
    assert run.data.metrics["champion.rating.srcc"] > run.data.metrics["candidate.rating.srcc"]  # both sets logged


def test_loading_champion_gives_the_promoted_version(flow, models):
    import torch
    from safetensors.torch import load_file

    loaded = flow["loaded"]
    assert loaded.version == flow["versions"]["intact"]

    def lm_head(d):
        return next(t for f in Path(d).glob("*.safetensors") for k, t in load_file(f).items() if "lm_head" in k)

    assert torch.equal(lm_head(loaded.local_dir), lm_head(models["intact"]))   # the intact weights, not reversed
    assert not torch.equal(lm_head(loaded.local_dir), lm_head(models["reversed"]))


def test_rollback_restores_previous_champion(flow, client):
    from iqa_spider.registry.promotion import PromotionError, rollback

    name, v, d = flow["name"], flow["versions"], flow["rollback"]
    assert flow["aliases"]["rollback"] == (v["reversed"], None)
    assert d["champion_before"] == v["intact"] and d["champion_after"] == v["reversed"]
    assert client.get_model_version(name, v["intact"]).tags["promotion.rolled_back_run_id"] == d["run_id"]
    assert client.get_run(d["run_id"]).data.tags["decision"] == "rolled_back"
    with pytest.raises(PromotionError, match="no previous-champion"):
        rollback(name, client=client, gate=flow["cfg"])


def test_models_list_cli(flow, capsys):
    from iqa_spider.cli import main

    assert main(["models", "list", "--model", flow["name"]]) == 0
    out = capsys.readouterr().out
    v = flow["versions"]
    assert f"v{v['reversed']}" in out and "champion" in out and "promotion: refused" in out
    assert "rating.srcc=" in out and "train_loss=" in out and "kind=reversed" in out
    assert main(["models", "list", "--model", flow["name"], "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["version"]: r["aliases"] for r in rows}[v["reversed"]] == ["champion"]


def test_unknown_version_or_missing_data_is_one_line_before_any_evaluation(flow, mlflow_server, capsys):
    from iqa_spider.cli import main

    base = ["--model", flow["name"], f"tracking.uri={mlflow_server.uri}"]
    assert main(["promote", "--candidate", "999", "--eval-data", flow["cfg"].data.uri, *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"config error: key 'candidate': registered model {flow['name']!r} has no version 999"), err
    assert main(["promote", "--candidate", flow["versions"]["intact"], "--eval-data", "/no/such/data", *base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "key 'data.uri'" in err[-1] and "no such file or folder" in err[-1], err


# ------------------------------------------------------------------ concurrent promotions


def test_concurrent_promotions_leave_consistent_aliases(client, models, eval_data, tmp_path_factory):
    """Two better candidates promoted at once, lined up so that both evaluate the same
    champion before either decides: the second to take the lock must see that the champion
    moved, evaluate the new one, and decide again."""
    from iqa_spider.registry.lock import RegistryLock
    from iqa_spider.registry.promotion import promote

    name = "promo-race"
    cfg = gate_config(name, eval_data, tmp_path_factory.mktemp("promo_cache_race"))
    first = register(client, name, models["reversed"], "reversed")
    assert promote(first, eval_data, cfg, client=client)["decision"] == "promoted"
    cands = [register(client, name, models["intact"], "intact") for _ in range(2)]
    barrier = threading.Barrier(2, timeout=300)
    results, errors = {}, []

    def line_up(state):
        if state["attempt"] == 1:
            barrier.wait()

    def run(version):
        try:
            results[version] = promote(version, eval_data, cfg, client=client, on_evaluated=line_up)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    champion, previous = aliases(client, name)
    last = next(d for d in results.values() if d["candidate"] == champion)
    other = next(d for d in results.values() if d["candidate"] != champion)
    # the final pair comes from one decision, and that decision saw the other's result
    assert last["decision"] == "promoted" and (champion, previous) == (last["champion_after"],
                                                                       last["previous_champion_after"])
    assert other["decision"] == "promoted" and other["champion_before"] == first
    assert previous == other["candidate"] and last["champion_before"] == other["candidate"]
    assert last["champion_moved"] == [{"evaluated": first, "found": other["candidate"]}]
    assert not RegistryLock(client, name).held() and RegistryLock(client, name)._holder() is None
