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
import tempfile
from collections.abc import Sequence
from pathlib import Path

from iqa_spider import storage
from iqa_spider.config import ConfigError, load_config
from iqa_spider.config.schemas import AnnotateConfig, DemoConfig, TrainConfig
from iqa_spider.entrypoint import run_job
from iqa_spider.evaluate.config import EvaluateConfig
from iqa_spider.evaluate.job import run_evaluate
from iqa_spider.model.tiny import family_for, init_tiny
from iqa_spider.registry.config import PromoteConfig
from iqa_spider.registry.promotion import run_promote
from iqa_spider.score.config import ScoreConfig
from iqa_spider.score.job import run_score
from iqa_spider.tracking import tracking_uri
from iqa_spider.train.export import HF_DIR
from iqa_spider.train.job import run_train

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]  # platform/iqa_spider/demo.py -> repository root


def stage_config(schema: type, path: str, overrides: Sequence[str], wiring: Sequence[str]):
    """A shipped job config with the demo's overrides, then the wiring between stages.

    ``path`` is relative to the repository: the package's own checkout, or, in a submitted job
    (where the package travels on its own as a py_module), the job's working directory.
    """
    found = next((root / path for root in (REPO, Path.cwd()) if (root / path).is_file()), REPO / path)
    return load_config(schema, found, [*overrides, *wiring])


def run_demo(cfg: DemoConfig) -> dict[str, str]:
    from iqa_spider.annotate.pipeline import run_annotate, write_builtin_photos

    work = workdir_uri(cfg.workdir)
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not mlflow_uri:
        if storage.is_s3(work):
            raise ConfigError("a workdir in S3 means a shared setup: set MLFLOW_TRACKING_URI to the tracking "
                              "server every node can reach (the default sqlite file is local)", key="workdir")
        mlflow_uri = f"sqlite:///{os.path.join(work, 'mlflow.db')}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(mlflow_uri)  # evaluate logs there too
    st = cfg.stages
    out: dict[str, str] = {}

    family = family_for(cfg.tiny.size, cfg.tiny.family)
    log.info("demo 1/7: %s %s model, random init (seed %d)", cfg.tiny.size, family, cfg.tiny.seed)
    model = write_tiny_model(family, cfg.tiny.seed, storage.join(work, "base_model"), cfg.tiny.size)
    out["base model"] = model
    # every stage that loads the model is told its class (the shipped configs name the 7B's)
    model_family = f"model.family={family}"

    log.info("demo 2/7: scikit-image's bundled photos as the pristine collection")
    photos = storage.join(work, "photos")
    write_builtin_photos(photos)
    out["photos"] = photos

    log.info("demo 3/7: annotate (Ray Data)")
    dataset = storage.join(work, "dataset")
    run_annotate(stage_config(AnnotateConfig, st.annotate, st.annotate_overrides,
                              [f"input.uri={photos}", f"output.uri={dataset}"]))
    out["dataset"] = dataset

    log.info("demo 4/7: train (Ray Train, DeepSpeed ZeRO-3) and register in MLflow")
    trained = run_train(stage_config(TrainConfig, st.train, st.train_overrides,
                                     [f"data.uri={dataset}", f"model.path={model}", model_family,
                                      f"output.uri={storage.join(work, 'runs')}", f"tracking.uri={mlflow_uri}"]))
    out["trained model"] = storage.join(trained["checkpoint"], HF_DIR)
    if trained.get("model_version"):
        out["registered"] = f"models:/{trained['registered_model']}/{trained['model_version']}"

    log.info("demo 5/7: evaluate the trained model on the held-out split")
    run_evaluate(stage_config(EvaluateConfig, st.evaluate, st.evaluate_overrides,
                                       [f"model.path={out['trained model']}", model_family, f"data.uri={dataset}",
                                        f"output.uri={storage.join(work, 'evaluate')}"]))
    out["evaluation"] = storage.join(work, "evaluate", "report.html")

    if trained.get("model_version"):
        log.info("demo 6/7: gated promotion of the new version to champion")
        decision = run_promote(stage_config(PromoteConfig, st.promote, st.promote_overrides,
                                            [f"registered_model={trained['registered_model']}",
                                             f"candidate={trained['model_version']}", model_family,
                                             f"data.uri={dataset}",
                                             f"tracking.uri={mlflow_uri}"]))
        if decision["champion_after"] is not None:
            out["champion"] = f"models:/{trained['registered_model']}@champion -> version {decision['champion_after']}"
        else:  # the gate's floors above chance refused it: say so, and score with the model anyway
            out["gate"] = f"refused: {'; '.join(decision.get('reasons') or [])}"
            log.warning("demo: the gate refused version %s (%s); scoring with the trained model itself",
                        trained["model_version"], out["gate"])

    log.info("demo 7/7: batch-score a folder with the champion (Ray Data), broken files included")
    incoming = write_incoming(storage.join(work, "incoming"), photos)
    champion = (f"models:/{trained['registered_model']}@champion" if out.get("champion")
                else out["trained model"])
    scored = run_score(stage_config(ScoreConfig, st.score, st.score_overrides,
                                    [f"model.path={champion}", model_family, f"input.uri={incoming}",
                                     f"output.uri={storage.join(work, 'scores')}"]))
    out["scores"] = storage.join(work, "scores", "data")
    out["score report"] = scored.get("report", storage.join(work, "scores", "_summary.json"))
    out["mlflow"] = mlflow_uri

    print("\nIQA-Spider demo finished. Outputs:")
    for name, where in out.items():
        print(f"  {name:<14} {where}")
    if storage.is_s3(work):
        print(f"\nThe reports are in S3: copy them to open them in a browser, e.g.\n"
              f"  aws s3 sync {storage.join(work, 'scores')} scores/ && open scores/report.html")
    else:
        print(f"\nOpen {out['score report']} and {out['evaluation']} in a browser.")
    if mlflow_uri.startswith(("http://", "https://")):
        print(f"Training curves and the registry: {mlflow_uri}")
    else:
        print(f"Training curves and the registry:\n"
              f"  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {mlflow_uri}")
    return out


def workdir_uri(workdir: str) -> str:
    """The workdir as a URI: S3 stays as given, a local folder becomes absolute and exists."""
    if storage.is_s3(workdir):
        return workdir.rstrip("/")
    local = Path(workdir.removeprefix("file://")).expanduser().resolve()
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def write_tiny_model(family: str, seed: int, uri: str, size: str = "tiny") -> str:
    """The random checkpoint of preset ``size`` at ``uri``; built locally and copied when ``uri`` is in S3."""

    if not storage.is_s3(uri):
        return str(init_tiny(family, uri, seed=seed, size=size))
    with tempfile.TemporaryDirectory() as tmp:
        storage.copy_tree(str(init_tiny(family, Path(tmp) / "model", seed=seed, size=size)), uri)
    return uri


def write_incoming(folder: str, photos: str) -> str:
    """A folder to score as users have them: nested photos, plus files that must not stop the job."""
    pngs = list(storage.iter_files(photos, (".png",)))
    for i, photo in enumerate(pngs):
        name = storage.relative_key(photos, photo)
        storage.write_bytes(storage.join(folder, "nested", name) if i % 2 else storage.join(folder, name),
                            storage.read_bytes(photo))
    good = storage.read_bytes(pngs[0])
    storage.write_bytes(storage.join(folder, "truncated.png"), good[: len(good) // 3])
    storage.write_bytes(storage.join(folder, "empty.jpg"), b"")
    storage.write_bytes(storage.join(folder, "notes.jpg"), b"not a JPEG at all")
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    return run_job(DemoConfig, run_demo, argv, description=__doc__.splitlines()[0])
