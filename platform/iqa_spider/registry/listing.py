"""`iqa-spider models list`: every version of a registered model with its aliases, metrics and
promotion record."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from iqa_spider.registry.aliases import TAG, mlflow_client


def list_versions(registered_model: str = "iqa-spider", client=None) -> list[dict[str, Any]]:
    """Every version, newest first: aliases, status, run metrics, promotion metrics and tags."""
    client = client or mlflow_client()
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


__all__ = ["list_versions", "format_versions"]
