"""The registry's aliases and records: which version is ``champion`` and ``previous-champion``,
moving them, and recording each decision as version tags and an MLflow run."""
from __future__ import annotations

import json
import time
from typing import Any

from iqa_spider.config import ConfigError
from iqa_spider.registry.config import PromoteConfig
from iqa_spider.registry.gate import is_finite
from iqa_spider.registry.lock import error_code
from iqa_spider.tracking import experiment_id, git_commit, redact, tracking_uri

CHAMPION = "champion"
PREVIOUS = "previous-champion"
TAG = "promotion."


def mlflow_client(uri: str | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri(uri))


def names_nothing(exc: Exception) -> bool:
    """An MlflowException saying the registry has no such model, version or alias (servers and
    stores word it differently)."""
    return any(c in error_code(exc) for c in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"))


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if names_nothing(exc):
            return None
        raise


def aliases(client, name: str) -> dict[str, str | None]:
    return {CHAMPION: alias_version(client, name, CHAMPION), PREVIOUS: alias_version(client, name, PREVIOUS)}


def set_aliases(client, name: str, champion: str, previous: str | None) -> None:
    """previous-champion first: a crash in between leaves both aliases on the old champion
    (the old state, with previous-champion pointing at the serving version), never a
    champion whose previous-champion is unrelated."""
    if previous is None:
        if alias_version(client, name, PREVIOUS) is not None:
            client.delete_registered_model_alias(name, PREVIOUS)
    else:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, champion)


def record_decision(client, cfg: PromoteConfig, decision: dict[str, Any]) -> str:
    """An MLflow run in the promotion experiment: params, both metric sets, decision.json."""
    from mlflow.entities import Metric, Param, RunTag

    exp_id = experiment_id(client, cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=f"{decision['action']}-{cfg.registered_model}-v{decision['candidate']}",
                            tags={"registered_model": cfg.registered_model, "decision": decision["decision"],
                                  "candidate_version": str(decision["candidate"]), "git_commit": git_commit()})
    run_id = run.info.run_id
    decision["run_id"] = run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(f"{who}.{k}", float(v), ts, 0)
               for who in ("candidate", "champion") for k, v in (decision.get(f"{who}_metrics") or {}).items()
               if is_finite(v)]
    params = [Param(k, redact(str(decision.get(k)))) for k in ("registered_model", "candidate", "champion_before",
                                                      "previous_champion_before", "data_uri")]
    for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    client.log_batch(run_id, params=params, tags=[RunTag("decision_reasons", "; ".join(decision["reasons"])[:4900])])
    client.log_text(run_id, redact(json.dumps(decision, indent=2, default=str)), "decision.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def tag_version(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, str(v)[:4900])


def require_version(client, name: str, version: str) -> None:
    """Fail before any evaluation, in one line naming the key, for a version the registry lacks."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if names_nothing(exc):
            raise ConfigError(f"registered model {name!r} has no version {version}", key="candidate") from None
        raise


__all__ = ["CHAMPION", "PREVIOUS", "TAG", "mlflow_client", "names_nothing", "alias_version", "aliases",
           "set_aliases", "record_decision", "tag_version", "require_version"]
