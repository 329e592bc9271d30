"""`make demo`: the main job end to end on embedded defaults.

A straight path through the real jobs, each loaded from its shipped config with small
overrides, each reading what the previous one wrote under `workdir`:

    tiny model -> bundled photos -> annotate -> train (+ MLflow registry) -> evaluate -> promote

Nothing is special-cased: the same functions run when a user calls the jobs one by one.
MLflow is a sqlite file in the workdir unless MLFLOW_TRACKING_URI is set.
"""
from __future__ import annotations

import logging
import os
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
    from iqa_spider.registry.tracking import tracking_uri
    from iqa_spider.train.export import HF_DIR
    from iqa_spider.train.job import run_train

    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(mlflow_uri)  # evaluate logs there too
    st = cfg.stages
    out: dict[str, str] = {}

    log.info("demo 1/6: tiny %s model (seed %d)", cfg.tiny.family, cfg.tiny.seed)
    model = init_tiny(cfg.tiny.family, work / "tiny_model", seed=cfg.tiny.seed)
    out["tiny model"] = str(model)

    log.info("demo 2/6: scikit-image's bundled photos as the pristine collection")
    write_builtin_photos(str(work / "photos"))
    out["photos"] = str(work / "photos")

    log.info("demo 3/6: annotate (Ray Data)")
    dataset = work / "dataset"
    run_annotate(stage_config(AnnotateConfig, st.annotate, st.annotate_overrides,
                              [f"input.uri={work / 'photos'}", f"output.uri={dataset}"]))
    out["dataset"] = str(dataset)

    log.info("demo 4/6: train (Ray Train, DeepSpeed ZeRO-3, LoRA) and register in MLflow")
    trained = run_train(stage_config(TrainConfig, st.train, st.train_overrides,
                                     [f"data.uri={dataset}", f"model.path={model}", f"output.uri={work / 'runs'}",
                                      f"tracking.uri={mlflow_uri}"]))
    out["trained model"] = f"{trained['checkpoint']}/{HF_DIR}"
    if trained.get("model_version"):
        out["registered"] = f"models:/{trained['registered_model']}/{trained['model_version']}"

    log.info("demo 5/6: evaluate the trained model on the held-out split")
    run_evaluate(stage_config(EvaluateConfig, st.evaluate, st.evaluate_overrides,
                                       [f"model.path={out['trained model']}", f"data.uri={dataset}",
                                        f"output.uri={work / 'evaluate'}"]))
    out["evaluation"] = str(work / "evaluate" / "report.html")

    if trained.get("model_version"):
        log.info("demo 6/6: gated promotion of the new version to champion")
        decision = run_promote(stage_config(PromoteConfig, st.promote, st.promote_overrides,
                                            [f"registered_model={trained['registered_model']}",
                                             f"candidate={trained['model_version']}", f"data.uri={dataset}",
                                             f"tracking.uri={mlflow_uri}"]))
        out["champion"] = f"models:/{trained['registered_model']}@champion -> version {decision['champion_after']}"
    out["mlflow"] = mlflow_uri

    print("\nIQA-Spider demo finished. Outputs:")
    for name, where in out.items():
        print(f"  {name:<14} {where}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(DemoConfig, run_demo, argv, description=__doc__.splitlines()[0])
