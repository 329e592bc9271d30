"""Gated promotion and rollback on MLflow registry aliases (not the deprecated stages).

- ``champion`` is the version that serves (``models:/iqa-spider@champion``);
  ``previous-champion`` is the one it replaced, for :func:`rollback`.
- :func:`promote` evaluates the candidate and the current champion with the evaluation
  harness on the same data, checks the gate (per metric: direction, tolerance against the
  champion, absolute floor), and only if every check passes moves ``champion`` to the
  candidate and ``previous-champion`` to the old champion. A refusal moves nothing.
- Every decision is recorded twice: tags on the candidate version (``promotion.*``) and an
  MLflow run in the promotion experiment (both metric sets, ``decision.json``).

Concurrency. The alias moves happen under :class:`RegistryLock`, a lease that works across
processes and machines sharing the registry: it *is* a registered model named
``<name>.promotion-lock``, created with the owner and expiry as tags. Creating a registered
model is atomic in MLflow's database stores (a unique key on the name: the loser gets
RESOURCE_ALREADY_EXISTS), so two holders are impossible without relying on timing, unlike
a tag written and read back. A lease older than ``ttl_s`` (a crashed holder) is broken. The
lock is held only for the decision and the alias moves, not for the evaluations; so, under
the lock, the champion is read again and, if it is no longer the one evaluated, the new
champion is evaluated and the decision made again (``max_attempts``). Just before the
aliases move, the lease is checked to be still ours.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from iqa_spider.config import ConfigError
from iqa_spider.registry.config import GateMetric, PromoteConfig, PromotionLockSettings

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous-champion"
LOCK_SUFFIX = ".promotion-lock"
TAG = "promotion."
SAMPLES = "evaluated_samples"  # how many samples an evaluation scored: equal for candidate and champion
CHANCE = "chance."  # prefix of the chance figures evaluate_version adds beside the metrics


class PromotionError(RuntimeError):
    """The promotion or rollback could not be carried out (not a gate refusal)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _client(uri: str | None = None):
    from mlflow import MlflowClient

    from iqa_spider.tracking import tracking_uri

    return MlflowClient(tracking_uri(uri))


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _names_nothing(exc: Exception) -> bool:
    """An MlflowException saying the registry has no such model, version or alias (servers and
    stores word it differently)."""
    return any(c in _error_code(exc) for c in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"))


# ============================================================== the lock


class RegistryLock:
    """A lease on promotions of one registered model: the registered model ``<name>.promotion-lock``."""

    def __init__(self, client, name: str, settings: PromotionLockSettings | None = None):
        self.client, self.name = client, name + LOCK_SUFFIX
        self.settings = settings or PromotionLockSettings()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"

    def _holder(self) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(self.name).tags)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in _error_code(exc):
                return None
            raise

    def acquire(self) -> None:
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.settings.wait_s
        while True:
            expires = time.time() + self.settings.ttl_s
            try:
                self.client.create_registered_model(
                    self.name, tags={"owner": self.owner, "expires_at": f"{expires:.3f}"},
                    description="held while a promotion or rollback moves aliases; see docs/registry.md")
                return
            except MlflowException as exc:
                if not any(c in _error_code(exc) for c in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")):
                    raise
            holder = self._holder()
            if holder is not None and holder.get("owner") == self.owner:
                return  # our create went through but its answer was lost (client retry)
            if holder is not None and float(holder.get("expires_at", 0)) < time.time():
                self._break(holder)
                continue
            if time.monotonic() > deadline:
                raise PromotionError(f"lock {self.name} held by {holder and holder.get('owner')} for longer than "
                                     f"{self.settings.wait_s:.0f} s")
            time.sleep(self.settings.poll_s * random.uniform(0.5, 1.5))

    def _break(self, stale: dict[str, str]) -> None:
        """Delete a lease whose holder let it expire (re-read first: only that holder's)."""
        now = self._holder()
        if now is None or now.get("owner") != stale.get("owner"):
            return
        log.warning("breaking stale promotion lock %s of %s", self.name, stale.get("owner"))
        self.release(owner=stale.get("owner"))

    def held(self) -> bool:
        holder = self._holder()
        return holder is not None and holder.get("owner") == self.owner \
            and float(holder.get("expires_at", 0)) > time.time()

    def release(self, owner: str | None = None) -> None:
        from mlflow.exceptions import MlflowException

        holder = self._holder()
        if holder is None or holder.get("owner") != (owner or self.owner):
            return
        try:
            self.client.delete_registered_model(self.name)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in _error_code(exc):
                raise

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ============================================================== the gate


@dataclass
class Check:
    metric: str
    direction: str
    tolerance: float
    floor: float | None
    candidate: float | None
    champion: float | None
    passed: bool
    reason: str


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def check_gate(gate: Sequence[GateMetric], candidate: dict[str, float],
               champion: dict[str, float] | None) -> list[Check]:
    """One :class:`Check` per gate metric. ``champion`` None: no champion (floors decide)."""
    checks = []
    for g in gate:
        c = candidate.get(g.name)
        ch = champion.get(g.name) if champion is not None else None
        sign = 1.0 if g.direction == "higher" else -1.0
        if not _finite(c):
            passed, reason = False, f"{g.name}: candidate value {c} is missing or not finite"
        elif g.floor is not None and sign * (c - g.floor) < 0:
            passed, reason = False, f"{g.name}: candidate {c:.4f} is past the floor {g.floor} ({g.direction} is better)"
        elif g.above_chance is not None and not _finite(candidate.get(CHANCE + g.name)):
            passed, reason = False, f"{g.name}: the evaluation reported no chance figure to beat"
        elif g.above_chance is not None and c < candidate[CHANCE + g.name] + g.above_chance:
            passed, reason = False, (f"{g.name}: candidate {c:.4f} does not beat chance "
                                     f"{candidate[CHANCE + g.name]:.4f} by {g.above_chance}")
        elif champion is None:
            met = [f"meets the floor {g.floor}"] if g.floor is not None else []
            if g.above_chance is not None:
                met.append(f"beats chance {candidate[CHANCE + g.name]:.4f} by at least {g.above_chance}")
            passed, reason = True, f"{g.name}: candidate {c:.4f} {' and '.join(met) or 'no floor set'} (no champion)"
        elif not _finite(ch):
            passed, reason = True, f"{g.name}: champion value {ch} is not finite, nothing to compare against"
        elif sign * (c - ch) < -g.tolerance:
            passed, reason = False, (f"{g.name}: candidate {c:.4f} is worse than champion {ch:.4f} by more than "
                                     f"the tolerance {g.tolerance} ({g.direction} is better)")
        else:
            passed, reason = True, f"{g.name}: candidate {c:.4f} vs champion {ch:.4f} within tolerance {g.tolerance}"
        checks.append(Check(g.name, g.direction, g.tolerance, g.floor, c, ch, passed, reason))
    c_n, ch_n = candidate.get(SAMPLES), champion.get(SAMPLES) if champion is not None else None
    if c_n is not None and ch_n is not None:  # a sample unreadable for one run only: not comparable
        same = c_n == ch_n
        checks.append(Check(SAMPLES, "equal", 0.0, None, c_n, ch_n, same,
                            f"{SAMPLES}: both evaluated on {c_n:g} samples" if same else
                            f"{SAMPLES}: candidate evaluated on {c_n:g} samples, champion on {ch_n:g}; "
                            "the metrics are not comparable (an image was unreadable for one run)"))
    return checks


# ============================================================== evaluation


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


def evaluate_version(cfg: PromoteConfig, version: str, data_uri: str) -> dict[str, float]:
    """The harness (:func:`iqa_spider.evaluate.job.evaluate`) on one registered version ->
    flattened metrics."""
    from iqa_spider.evaluate.config import EvalMlflow, EvalOutput, EvaluateConfig
    from iqa_spider.evaluate.job import evaluate
    from iqa_spider.evaluate.metrics import flatten_metrics
    from iqa_spider.tracking import tracking_uri

    # The version is read from the server the gate decides on, whatever MLFLOW_TRACKING_URI says.
    model = replace(cfg.model, path=model_uri(cfg.registered_model, version),
                    tracking_uri=cfg.model.tracking_uri or tracking_uri(cfg.tracking.uri))
    ecfg = EvaluateConfig(model=model,
                          infer=cfg.infer, segmenter=cfg.segmenter, data=replace(cfg.data, uri=data_uri),
                          output=EvalOutput(uri=None, html=False), mlflow=EvalMlflow(enabled="false"),
                          mappings=list(cfg.mappings))
    report = evaluate(ecfg)
    if str(report["model_version"]) != str(version):
        raise PromotionError(f"evaluated version {report['model_version']}, expected {version}")
    log.info("evaluated %s version %s: %d images, %d samples", cfg.registered_model, version,
             report["images"], report["samples"])
    metrics = flatten_metrics(report["metrics"])
    # The chance figures of the same samples, for gate metrics with above_chance.
    metrics.update({CHANCE + k: v for k, v in flatten_metrics(report.get("chance") or {}).items()})
    metrics[SAMPLES] = float(report["samples"])  # check_gate compares only like with like
    return metrics


# ============================================================== aliases and records


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _names_nothing(exc):
            return None
        raise


def aliases(client, name: str) -> dict[str, str | None]:
    return {CHAMPION: alias_version(client, name, CHAMPION), PREVIOUS: alias_version(client, name, PREVIOUS)}


def _set_aliases(client, name: str, champion: str, previous: str | None) -> None:
    """previous-champion first: a crash in between leaves both aliases on the old champion
    (the old state, with previous-champion pointing at the serving version), never a
    champion whose previous-champion is unrelated."""
    if previous is None:
        if alias_version(client, name, PREVIOUS) is not None:
            client.delete_registered_model_alias(name, PREVIOUS)
    else:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    client.set_registered_model_alias(name, CHAMPION, champion)


def _record_run(client, cfg: PromoteConfig, decision: dict[str, Any]) -> str:
    """An MLflow run in the promotion experiment: params, both metric sets, decision.json."""
    from mlflow.entities import Metric, Param, RunTag

    from iqa_spider.tracking import experiment_id, git_commit, redact

    exp_id = experiment_id(client, cfg.tracking.experiment)
    run = client.create_run(exp_id, run_name=f"{decision['action']}-{cfg.registered_model}-v{decision['candidate']}",
                            tags={"registered_model": cfg.registered_model, "decision": decision["decision"],
                                  "candidate_version": str(decision["candidate"]), "git_commit": git_commit()})
    run_id = run.info.run_id
    decision["run_id"] = run_id
    ts = int(time.time() * 1000)
    metrics = [Metric(f"{who}.{k}", float(v), ts, 0)
               for who in ("candidate", "champion") for k, v in (decision.get(f"{who}_metrics") or {}).items()
               if _finite(v)]
    params = [Param(k, redact(str(decision.get(k)))) for k in ("registered_model", "candidate", "champion_before",
                                                      "previous_champion_before", "data_uri")]
    for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[i:i + 900])
    client.log_batch(run_id, params=params, tags=[RunTag("decision_reasons", "; ".join(decision["reasons"])[:4900])])
    client.log_text(run_id, redact(json.dumps(decision, indent=2, default=str)), "decision.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _tag_version(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, TAG + k, str(v)[:4900])


# ============================================================== promote / rollback


def promote(candidate_version: str | int, eval_data_uri: str, gate: PromoteConfig | None = None, client=None,
            on_evaluated: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Evaluate, gate, and (if every check passes) move the aliases. Returns the decision.

    ``gate`` is the loaded gate file (defaults when None). ``on_evaluated(state)`` is called
    after each round of evaluations, before the lock is taken (tests line up concurrent
    promotions with it).
    """
    cfg = gate or PromoteConfig()
    client = client or _client(cfg.tracking.uri)
    name, cand = cfg.registered_model, str(candidate_version)
    _require_version(client, name, cand)
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
                _set_aliases(client, name, cand, champion)
            decision.update(champion_after=cand if promoted else now[CHAMPION],
                            previous_champion_after=champion if promoted else now[PREVIOUS], decided_at=_now())
            _record_run(client, cfg, decision)
            version_tags = {"decision": decision["decision"], "reasons": "; ".join(reasons),
                            "run_id": decision["run_id"], "decided_at": decision["decided_at"],
                            "champion": champion or "none", "data_uri": eval_data_uri}
            for c in checks:
                version_tags[f"candidate.{c.metric}"] = c.candidate
                version_tags[f"champion.{c.metric}"] = c.champion
            _tag_version(client, name, cand, version_tags)
            break
    log.info("promotion of %s version %s: %s (%s)", name, cand, decision["decision"], "; ".join(decision["reasons"]))
    return decision


def rollback(registered_model: str = "iqa-spider", client=None, gate: PromoteConfig | None = None) -> dict[str, Any]:
    """champion <- previous-champion; previous-champion is then removed (a second rollback
    needs a new promotion first). Recorded as tags on both versions and as an MLflow run."""
    cfg = replace(gate or PromoteConfig(), registered_model=registered_model)
    client = client or _client(cfg.tracking.uri)
    name = cfg.registered_model
    with RegistryLock(client, name, cfg.lock) as lock:
        now = aliases(client, name)
        if now[PREVIOUS] is None:
            raise PromotionError(f"{name} has no {PREVIOUS} alias to roll back to")
        if not lock.held():
            raise PromotionError(f"lost the promotion lock {lock.name}; aliases not moved")
        _set_aliases(client, name, now[PREVIOUS], None)
        decision = {"action": "rollback", "decision": "rolled_back", "registered_model": name,
                    "candidate": now[PREVIOUS], "data_uri": None, "champion_before": now[CHAMPION],
                    "previous_champion_before": now[PREVIOUS], "champion_after": now[PREVIOUS],
                    "previous_champion_after": None, "decided_at": _now(),
                    "reasons": [f"rollback: champion {now[CHAMPION]} -> {now[PREVIOUS]}"]}
        _record_run(client, cfg, decision)
        _tag_version(client, name, now[PREVIOUS], {"restored_at": decision["decided_at"],
                                                   "restored_run_id": decision["run_id"]})
        if now[CHAMPION] is not None:
            _tag_version(client, name, now[CHAMPION], {"rolled_back_at": decision["decided_at"],
                                                       "rolled_back_run_id": decision["run_id"]})
    log.info("rollback of %s: champion %s -> %s", name, now[CHAMPION], now[PREVIOUS])
    return decision


# ============================================================== listing


def list_versions(registered_model: str = "iqa-spider", client=None) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, status, run metrics, promotion metrics and tags."""
    client = client or _client()
    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(registered_model).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{registered_model}'"):
        metrics: dict[str, float] = {}
        if mv.run_id:
            try:
                metrics = dict(client.get_run(mv.run_id).data.metrics)
            except Exception:  # noqa: BLE001 - a deleted run must not hide the version
                metrics = {}
        tags = dict(mv.tags or {})
        gate = {k[len(TAG + "candidate."):]: v for k, v in tags.items() if k.startswith(TAG + "candidate.")}
        rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                     "status": mv.status,
                     "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).isoformat(
                         timespec="seconds") if mv.creation_timestamp else None,
                     "run_id": mv.run_id, "run_metrics": metrics, "gate_metrics": gate, "tags": tags})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def format_versions(rows: list[dict[str, Any]], name: str) -> str:
    if not rows:
        return f"{name}: no versions"
    out = [f"{name}: {len(rows)} version(s)"]
    for r in rows:
        tags = r["tags"]
        out.append(f"  v{r['version']:<4} {','.join(r['aliases']) or '-':<28} {r['status']:<7} {r['created'] or ''}"
                   f"  run {r['run_id'] or '-'}")
        if r["gate_metrics"]:
            out.append("        gate metrics: " + ", ".join(f"{k}={float(v):.4f}" if _is_float(v) else f"{k}={v}"
                                                         for k, v in sorted(r["gate_metrics"].items())))
        if r["run_metrics"]:
            keys = sorted(r["run_metrics"])[:8]
            out.append("        run metrics: " + ", ".join(f"{k}={r['run_metrics'][k]:.4g}" for k in keys))
        if TAG + "decision" in tags:
            out.append(f"        promotion: {tags[TAG + 'decision']} ({tags.get(TAG + 'decided_at', '')}): "
                       f"{tags.get(TAG + 'reasons', '')[:200]}")
        plain = {k: v for k, v in tags.items() if not k.startswith(TAG)}
        if plain:
            out.append("        tags: " + ", ".join(f"{k}={str(v)[:60]}" for k, v in sorted(plain.items())))
    return "\n".join(out)


def _is_float(v: Any) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# ============================================================== job and CLI


def _require_version(client, name: str, version: str) -> None:
    """Fail before any evaluation, in one line naming the key, for a version the registry lacks."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if _names_nothing(exc):
            raise ConfigError(f"registered model {name!r} has no version {version}", key="candidate") from None
        raise


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
    from iqa_spider.entrypoint import run_job

    result: dict[str, Any] = {}

    def run(cfg: PromoteConfig) -> None:
        try:
            result.update(run_promote(cfg))
        except PromotionError as exc:  # nothing moved (lost lock, wrong version evaluated): say why
            print(f"promote: {exc}", file=sys.stderr)
            result["decision"] = "failed"

    code = run_job(PromoteConfig, run, argv, description="promote: gated promotion of a registered model version")
    return code or (REFUSED_EXIT if result.get("decision") in ("refused", "failed") else 0)


def _default_gate_file() -> str:
    here = os.path.join("configs", "gate.yaml")
    if os.path.isfile(here):
        return here
    return os.path.join(os.path.dirname(__file__), "..", "..", "..", "configs", "gate.yaml")


def promote_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider promote --candidate N --eval-data URI [--gate FILE] [key=value ...]`."""
    import argparse

    p = argparse.ArgumentParser(prog="iqa-spider promote", description="gated promotion to the champion alias")
    p.add_argument("--candidate", required=True, help="registered model version to promote")
    p.add_argument("--eval-data", required=True, help="evaluation dataset URI (the same data for both models)")
    p.add_argument("--gate", default=None, help="gate file (default configs/gate.yaml)")
    p.add_argument("--model", default=None, help="registered model name (default: the gate file's)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides of the gate file, e.g. infer.batch_size=4")
    args = p.parse_args(argv)
    overrides = [f"candidate={args.candidate}", f"data.uri={args.eval_data}", *args.overrides]
    if args.model:
        overrides.append(f"registered_model={args.model}")
    return main(["--config", args.gate or _default_gate_file(), *overrides])


def rollback_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider rollback [--model NAME]`."""
    import argparse

    from iqa_spider.entrypoint import setup_logging

    p = argparse.ArgumentParser(prog="iqa-spider rollback", description="champion <- previous-champion")
    p.add_argument("--model", default="iqa-spider", help="registered model name")
    p.add_argument("--experiment", default="iqa-spider-promotion", help="MLflow experiment of the record")
    args = p.parse_args(argv)
    setup_logging()
    cfg = PromoteConfig(registered_model=args.model)
    cfg.tracking.experiment = args.experiment
    try:
        d = rollback(args.model, gate=cfg)
    except PromotionError as exc:
        print(f"rollback: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model}: champion {d['champion_before']} -> {d['champion_after']}; "
          f"previous-champion removed; mlflow run {d['run_id']}")
    return 0


def models_main(argv: Sequence[str] | None = None) -> int:
    """`iqa-spider models list [--model NAME] [--json]`."""
    import argparse

    p = argparse.ArgumentParser(prog="iqa-spider models", description="the model registry")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="versions, aliases, key metrics and tags")
    ls.add_argument("--model", default="iqa-spider", help="registered model name")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        rows = list_versions(args.model)
    except MlflowException as exc:
        print(f"models list: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2, default=str) if args.json else format_versions(rows, args.model))
    return 0


__all__ = ["promote", "rollback", "list_versions", "check_gate", "evaluate_version", "RegistryLock",
           "PromotionError", "Check", "CHAMPION", "PREVIOUS", "main", "promote_main", "rollback_main", "models_main"]
