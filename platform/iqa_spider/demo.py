"""`make demo`: the main job end to end on embedded defaults.

A straight path through the real jobs, each loaded from its shipped config with small
overrides, each reading what the previous one wrote under `workdir`:

    tiny model -> bundled photos -> annotate -> train (+ MLflow registry) -> evaluate -> promote
    -> batch-score a folder (the photos plus a few broken files) with the champion

Nothing is special-cased: the same functions run when a user calls the jobs one by one.
MLflow is a sqlite file in the workdir unless MLFLOW_TRACKING_URI is set.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from iqa_spider.config import load_config
from iqa_spider.config.schemas import DemoConfig
from iqa_spider.entrypoint import run_job

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # platform/iqa_spider/demo.py -> repository root


def stage_config(schema: type, path: str, overrides: Sequence[str], wiring: Sequence[str]):
    """A shipped job config with the demo's overrides, then the wiring between stages."""
    return load_config(schema, REPO / path, [*overrides, *wiring])


def run_demo(cfg: DemoConfig) -> dict[str, str]:
    from iqa_spider.annotate.pipeline import run_annotate, write_builtin_photos
    from iqa_spider.config.schemas import AnnotateConfig, TrainConfig
    from iqa_spider.infer.config import EvaluateConfig
    from iqa_spider.infer.evaluate import run_evaluate
    from iqa_spider.model.tiny import init_tiny
    from iqa_spider.registry.config import PromoteConfig
    from iqa_spider.registry.promotion import run_promote
    from iqa_spider.score.config import ScoreConfig
    from iqa_spider.score.job import run_score
    from iqa_spider.registry.tracking import tracking_uri
    from iqa_spider.train.export import HF_DIR
    from iqa_spider.train.job import run_train

    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(mlflow_uri)  # evaluate logs there too
    st = cfg.stages
    out: dict[str, str] = {}

    log.info("demo 1/7: tiny %s model (seed %d)", cfg.tiny.family, cfg.tiny.seed)
    model = init_tiny(cfg.tiny.family, work / "tiny_model", seed=cfg.tiny.seed)
    out["tiny model"] = str(model)

    log.info("demo 2/7: scikit-image's bundled photos as the pristine collection")
    write_builtin_photos(str(work / "photos"))
    out["photos"] = str(work / "photos")

    log.info("demo 3/7: annotate (Ray Data)")
    dataset = work / "dataset"
    run_annotate(stage_config(AnnotateConfig, st.annotate, st.annotate_overrides,
                              [f"input.uri={work / 'photos'}", f"output.uri={dataset}"]))
    out["dataset"] = str(dataset)

    log.info("demo 4/7: train (Ray Train, DeepSpeed ZeRO-3, LoRA) and register in MLflow")
    trained = run_train(stage_config(TrainConfig, st.train, st.train_overrides,
                                     [f"data.uri={dataset}", f"model.path={model}", f"output.uri={work / 'runs'}",
                                      f"tracking.uri={mlflow_uri}"]))
    out["trained model"] = f"{trained['checkpoint']}/{HF_DIR}"
    if trained.get("model_version"):
        out["registered"] = f"models:/{trained['registered_model']}/{trained['model_version']}"

    log.info("demo 5/7: evaluate the trained model on the held-out split")
    run_evaluate(stage_config(EvaluateConfig, st.evaluate, st.evaluate_overrides,
                                       [f"model.path={out['trained model']}", f"data.uri={dataset}",
                                        f"output.uri={work / 'evaluate'}"]))
    out["evaluation"] = str(work / "evaluate" / "report.html")

    if trained.get("model_version"):
        log.info("demo 6/7: gated promotion of the new version to champion")
        decision = run_promote(stage_config(PromoteConfig, st.promote, st.promote_overrides,
                                            [f"registered_model={trained['registered_model']}",
                                             f"candidate={trained['model_version']}", f"data.uri={dataset}",
                                             f"tracking.uri={mlflow_uri}"]))
        out["champion"] = f"models:/{trained['registered_model']}@champion -> version {decision['champion_after']}"

    log.info("demo 7/7: batch-score a folder with the champion (Ray Data), broken files included")
    incoming = write_incoming(work / "incoming", work / "photos")
    champion = (f"models:/{trained['registered_model']}@champion" if out.get("champion")
                else out["trained model"])
    scored = run_score(stage_config(ScoreConfig, st.score, st.score_overrides,
                                    [f"model.path={champion}", f"input.uri={incoming}",
                                     f"output.uri={work / 'scores'}"]))
    out["scores"] = str(work / "scores" / "data")
    out["score report"] = scored.get("report", str(work / "scores" / "_summary.json"))
    out["mlflow"] = mlflow_uri

    print("\nIQA-Spider demo finished. Outputs:")
    for name, where in out.items():
        print(f"  {name:<14} {where}")
    print(f"\nOpen {out['score report']} and {out['evaluation']} in a browser; for the training curves and "
          f"the registry:\n  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {mlflow_uri}")
    return out


def write_incoming(folder: Path, photos: Path) -> Path:
    """A folder to score as users have them: nested photos, plus files that must not stop the job."""
    import shutil

    (folder / "nested").mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(sorted(photos.glob("*.png"))):
        shutil.copy(photo, folder / ("nested" if i % 2 else "") / photo.name)
    good = next(iter(sorted(photos.glob("*.png")))).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_bytes(b"not a JPEG at all")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(DemoConfig, run_demo, argv, description=__doc__.splitlines()[0])
