"""Gated promotion and rollback on MLflow registry aliases (not the deprecated stages).

- ``champion`` is the version that serves (``models:/iqa-spider@champion``);
  ``previous-champion`` is the one it replaced, for :func:`rollback`.
- :func:`promote` evaluates the candidate and the current champion with the evaluation
  harness on the same data, checks the gate (per metric: direction, tolerance against the
  champion, absolute floor), and only if every check passes moves ``champion`` to the
  candidate and ``previous-champion`` to the old champion. A refusal moves nothing.
- Every decision is recorded twice: tags on the candidate version (``promotion.*``) and an
  MLflow run in the promotion experiment (both metric sets, ``decision.json``).

Concurrency. The alias moves happen under :class:`~iqa_spider.registry.lock.RegistryLock`, a
lease that works across processes and machines sharing the registry. It is held only for the
decision and the alias moves, not for the evaluations; so, under the lock, the champion is
read again and, if it is no longer the one evaluated, the new champion is evaluated and the
decision made again (``max_attempts``). Just before the aliases move, the lease is checked to
be still ours.

The gate is in :mod:`.gate`, the aliases and records in :mod:`.aliases`, listing in
:mod:`.listing`, and the command lines in :mod:`iqa_spider.cli.registry`.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from typing import Any

from iqa_spider.config import ConfigError
from iqa_spider.entrypoint import run_job
from iqa_spider.registry.aliases import (
    CHAMPION,
    PREVIOUS,
    aliases,
    mlflow_client,
    record_decision,
    require_version,
    set_aliases,
    tag_version,
)
from iqa_spider.registry.config import PromoteConfig
from iqa_spider.registry.gate import check_gate, evaluate_version
from iqa_spider.registry.lock import PromotionError, RegistryLock

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def promote(candidate_version: str | int, eval_data_uri: str, gate: PromoteConfig | None = None, client=None,
            on_evaluated: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Evaluate, gate, and (if every check passes) move the aliases. Returns the decision.

    ``gate`` is the loaded gate file (defaults when None). ``on_evaluated(state)`` is called
    after each round of evaluations, before the lock is taken (tests line up concurrent
    promotions with it).
    """
    cfg = gate or PromoteConfig()
    client = client or mlflow_client(cfg.tracking.uri)
    name, cand = cfg.registered_model, str(candidate_version)
    require_version(client, name, cand)
    decision: dict[str, Any] = {"action": "promote", "registered_model": name, "candidate": cand,
                                "data_uri": eval_data_uri, "gate": [asdict(g) for g in cfg.gate],
                                "started_at": _now()}
    log.info("promotion of %s version %s: evaluating the candidate", name, cand)
    cand_metrics = evaluate_version(cfg, cand, eval_data_uri)
    champion = aliases(client, name)[CHAMPION]
    champ_metrics: dict[str, dict[str, float]] = {}
    lock = RegistryLock(client, name, cfg.lock)
    for attempt in range(1, cfg.max_attempts + 1):
        if champion is not None and champion != cand and champion not in champ_metrics:
            log.info("promotion of %s version %s: evaluating champion version %s", name, cand, champion)
            champ_metrics[champion] = evaluate_version(cfg, champion, eval_data_uri)
        if on_evaluated is not None:
            on_evaluated({"candidate": cand, "champion": champion, "attempt": attempt})
        with lock:
            now = aliases(client, name)
            if now[CHAMPION] != champion:  # moved while we evaluated: evaluate the new one, decide again
                decision.setdefault("champion_moved", []).append({"evaluated": champion, "found": now[CHAMPION]})
                log.warning("champion moved from %s to %s during evaluation (attempt %d of %d)",
                            champion, now[CHAMPION], attempt, cfg.max_attempts)
                champion = now[CHAMPION]
                if attempt < cfg.max_attempts:
                    continue
                checks, reasons = [], [f"champion moved during evaluation {cfg.max_attempts} times; not decided"]
            elif champion == cand:
                checks, reasons = [], [f"version {cand} is already the champion"]
            else:
                checks = check_gate(cfg.gate, cand_metrics, champ_metrics.get(champion) if champion else None)
                reasons = [c.reason for c in checks if not c.passed] or [c.reason for c in checks]
            promoted = bool(checks) and all(c.passed for c in checks) and now[CHAMPION] == champion
            decision.update(decision="promoted" if promoted else "refused", reasons=reasons, attempts=attempt,
                            checks=[asdict(c) for c in checks], candidate_metrics=cand_metrics,
                            champion_metrics=champ_metrics.get(champion) if champion else None,
                            champion_before=now[CHAMPION], previous_champion_before=now[PREVIOUS],
                            lock_owner=lock.owner)
            if promoted:
                if not lock.held():
                    raise PromotionError(f"lost the promotion lock {lock.name} (lease expired?); aliases not moved")
                set_aliases(client, name, cand, champion)
            decision.update(champion_after=cand if promoted else now[CHAMPION],
                            previous_champion_after=champion if promoted else now[PREVIOUS], decided_at=_now())
            record_decision(client, cfg, decision)
            version_tags = {"decision": decision["decision"], "reasons": "; ".join(reasons),
                            "run_id": decision["run_id"], "decided_at": decision["decided_at"],
                            "champion": champion or "none", "data_uri": eval_data_uri}
            for c in checks:
                version_tags[f"candidate.{c.metric}"] = c.candidate
                version_tags[f"champion.{c.metric}"] = c.champion
            tag_version(client, name, cand, version_tags)
            break
    log.info("promotion of %s version %s: %s (%s)", name, cand, decision["decision"], "; ".join(decision["reasons"]))
    return decision


def rollback(registered_model: str = "iqa-spider", client=None, gate: PromoteConfig | None = None) -> dict[str, Any]:
    """champion <- previous-champion; previous-champion is then removed (a second rollback
    needs a new promotion first). Recorded as tags on both versions and as an MLflow run."""
    cfg = replace(gate or PromoteConfig(), registered_model=registered_model)
    client = client or mlflow_client(cfg.tracking.uri)
    name = cfg.registered_model
    with RegistryLock(client, name, cfg.lock) as lock:
        now = aliases(client, name)
        if now[PREVIOUS] is None:
            raise PromotionError(f"{name} has no {PREVIOUS} alias to roll back to")
        if not lock.held():
            raise PromotionError(f"lost the promotion lock {lock.name}; aliases not moved")
        set_aliases(client, name, now[PREVIOUS], None)
        decision = {"action": "rollback", "decision": "rolled_back", "registered_model": name,
                    "candidate": now[PREVIOUS], "data_uri": None, "champion_before": now[CHAMPION],
                    "previous_champion_before": now[PREVIOUS], "champion_after": now[PREVIOUS],
                    "previous_champion_after": None, "decided_at": _now(),
                    "reasons": [f"rollback: champion {now[CHAMPION]} -> {now[PREVIOUS]}"]}
        record_decision(client, cfg, decision)
        tag_version(client, name, now[PREVIOUS], {"restored_at": decision["decided_at"],
                                                   "restored_run_id": decision["run_id"]})
        if now[CHAMPION] is not None:
            tag_version(client, name, now[CHAMPION], {"rolled_back_at": decision["decided_at"],
                                                       "rolled_back_run_id": decision["run_id"]})
    log.info("rollback of %s: champion %s -> %s", name, now[CHAMPION], now[PREVIOUS])
    return decision


# ============================================================== the job (jobs/promote.py)


def run_promote(cfg: PromoteConfig) -> dict[str, Any]:
    if cfg.candidate is None:
        raise ConfigError("required value is missing (the version to promote)", key="candidate")
    decision = promote(cfg.candidate, cfg.data.uri, cfg)
    print(f"{cfg.registered_model} version {cfg.candidate}: {decision['decision'].upper()}")
    for c in decision.get("checks") or []:
        print(f"  [{'ok' if c['passed'] else 'FAIL'}] {c['reason']}")
    if not decision.get("checks"):
        print("  " + "; ".join(decision["reasons"]))
    print(f"  champion: {decision['champion_before']} -> {decision['champion_after']}; "
          f"previous-champion: {decision['previous_champion_before']} -> {decision['previous_champion_after']}")
    print(f"  mlflow run: {decision['run_id']}")
    return decision


REFUSED_EXIT = 1  # a refusal is a normal outcome, but CI pipelines must see it


def main(argv: Sequence[str] | None = None) -> int:
    """jobs/promote.py: `--config configs/gate.yaml candidate=N data.uri=URI [key=value ...]`."""

    result: dict[str, Any] = {}

    def run(cfg: PromoteConfig) -> None:
        try:
            result.update(run_promote(cfg))
        except PromotionError as exc:  # nothing moved (lost lock, wrong version evaluated): say why
            print(f"promote: {exc}", file=sys.stderr)
            result["decision"] = "failed"

    code = run_job(PromoteConfig, run, argv, description="promote: gated promotion of a registered model version")
    return code or (REFUSED_EXIT if result.get("decision") in ("refused", "failed") else 0)


__all__ = ["promote", "rollback", "run_promote", "main", "PromotionError", "REFUSED_EXIT"]
